import atexit
import functools
import importlib.util
import os
import shutil
import tempfile

# Tests never touch the user's ~/.loops; the tiny model is generated once per test session, in a
# home that is removed when the run ends.
if "LOOPS_HOME" not in os.environ:
    os.environ["LOOPS_HOME"] = tempfile.mkdtemp(prefix="loops-test-home-")
    atexit.register(functools.partial(shutil.rmtree, os.environ["LOOPS_HOME"], ignore_errors=True))

# The contract suite runs on fake, and on local too where torch is installed (the README's test
# command installs it). LOOPS_TEST_BACKENDS / --loops-backends choose otherwise.
if importlib.util.find_spec("torch") is not None:
    os.environ.setdefault("LOOPS_TEST_BACKENDS", "fake,local")
