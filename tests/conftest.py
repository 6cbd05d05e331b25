import os
import tempfile

# Tests never touch the user's ~/.loops; the tiny model is generated once per test session.
os.environ.setdefault("LOOPS_HOME", tempfile.mkdtemp(prefix="loops-test-home-"))
