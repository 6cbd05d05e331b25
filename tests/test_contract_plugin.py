"""The contract plugin's own mechanics: backend selection, capability skips, strict xfail gaps."""

from __future__ import annotations

import textwrap

pytest_plugins = ["pytester"]

BACKEND = textwrap.dedent('''
    from loops_backends.fake.backend import FakeBackend
    from loops_core import hookimpl

    class GappyBackend(FakeBackend):
        name = "gappy"
        capabilities = frozenset({"tokenizer"})          # no checkpoints
        known_gaps = {"test_gap_that_closed": "pretend this used to fail",
                      "test_real_gap": "not implemented yet"}

    @hookimpl
    def register_backends(register):
        register("gappy", GappyBackend)
''')

TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.requires("checkpoints")
    def test_needs_checkpoints(backend_name):
        pass

    def test_runs(backend_name):
        assert backend_name == "gappy"

    def test_real_gap(backend_name):
        raise NotImplementedError

    def test_gap_that_closed(backend_name):
        pass
''')


def test_capability_skip_and_strict_xfail(pytester, monkeypatch):
    pytester.makepyfile(gappy_plugin=BACKEND, test_suite=TESTS)
    pytester.makeconftest(textwrap.dedent('''
        import loops_core.plugins as plugins
        import gappy_plugin

        pm = plugins.get_plugin_manager(load_entrypoints=False)
        pm.register(gappy_plugin, name="gappy")
        plugins._default_pm = lambda: pm
    '''))
    monkeypatch.setenv("LOOPS_TEST_BACKENDS", "gappy")
    result = pytester.runpytest_subprocess("-rsxX")  # the plugin loads through its pytest11 entry point
    # skipped: no capability; xfailed: a known gap; failed: a gap that closed (strict xfail passes)
    result.assert_outcomes(passed=1, skipped=1, xfailed=1, failed=1)
    result.stdout.fnmatch_lines(["*backend does not declare checkpoints*"])
    result.stdout.fnmatch_lines(["*XPASS?strict?*pretend this used to fail*"])
