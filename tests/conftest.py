import importlib.util
import os
import tempfile

# Tests never touch the user's ~/.loops; the tiny model is generated once per test session.
os.environ.setdefault("LOOPS_HOME", tempfile.mkdtemp(prefix="loops-test-home-"))

# The contract suite runs on fake, and on local too where torch is installed (the README's test
# command installs it). LOOPS_TEST_BACKENDS / --loops-backends choose otherwise.
if importlib.util.find_spec("torch") is not None:
    os.environ.setdefault("LOOPS_TEST_BACKENDS", "fake,local")
