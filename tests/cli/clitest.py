"""Shared helpers for the command-line tests: run the lookback binary as a user
would and look at what it printed.

The binary comes from $LOOKBACK_BIN and the test fixtures from
$LOOKBACK_FIXTURES; CTest sets both (tests/CMakeLists.txt). Run by hand with

    LOOKBACK_BIN=build/bin/lookback LOOKBACK_FIXTURES=tests/fixtures \\
        python3 -m unittest discover -s tests/cli -p 'test_*.py' -v
"""

import os
import shutil
import subprocess
import tempfile
import time
import unittest

# The tool's exit codes (tools/lookback/common.hpp).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# A run that takes longer than this has hung; no CLI test needs a fraction of it.
TIMEOUT_S = 120


def binary():
    """Path of the lookback binary under test. Unset: the test is skipped (a
    run by hand); set to something that is not an executable: an error, so a
    broken build never passes as skipped tests."""
    path = os.environ.get("LOOKBACK_BIN")
    if not path:
        raise unittest.SkipTest("LOOKBACK_BIN is not set")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"LOOKBACK_BIN={path} is not an executable file")
    return path


def fixture(name):
    """Path of a file in tests/fixtures ($LOOKBACK_FIXTURES)."""
    folder = os.environ.get("LOOKBACK_FIXTURES") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), os.pardir, "fixtures")
    return os.path.join(folder, name)


def run(*args, input=None):
    """Runs `lookback ARGS...`; returns the CompletedProcess with text stdout and
    stderr (UTF-8) and returncode. Never raises on a non-zero exit."""
    return subprocess.run([binary(), *map(str, args)], input=input, capture_output=True,
                          text=True, encoding="utf-8", timeout=TIMEOUT_S, check=False)


def run_measured(*args, timeout=TIMEOUT_S):
    """Runs `lookback ARGS...` as run() does and measures that one process.
    Returns (CompletedProcess, seconds it took, its peak resident set in bytes);
    raises subprocess.TimeoutExpired (the process killed) past `timeout`."""
    command = [binary(), *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        while True:
            # wait4 gives this child's own rusage (getrusage would mix in every child's).
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                process.kill()
                os.wait4(process.pid, 0)
                process.returncode = -9
                raise subprocess.TimeoutExpired(command, timeout)
            time.sleep(0.005)
        seconds = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode,
                                             out.read().decode("utf-8"),
                                             err.read().decode("utf-8"))
    return result, seconds, usage.ru_maxrss * 1024


def sanitized():
    """Whether the binary is built with AddressSanitizer or ThreadSanitizer
    (linked statically or not: the instrumented code calls their init)."""
    with open(binary(), "rb") as f:
        image = f.read()
    return b"__asan_init" in image or b"__tsan_init" in image


class CliTestCase(unittest.TestCase):
    """A TestCase with a fresh temporary folder (self.tmp) and checks that
    every CLI test needs."""

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="lookback-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def path(self, name):
        """A path inside this test's temporary folder."""
        return os.path.join(self.tmp, name)

    def assert_ok(self, result):
        """Exit 0 and nothing on stderr."""
        self.assertEqual(result.returncode, EXIT_OK,
                         f"exit {result.returncode}, stderr: {result.stderr!r}")
        self.assertEqual(result.stderr, "")

    def assert_usage_error(self, result, mentions=None):
        """Exit 2, nothing on stdout, exactly one line on stderr (naming
        `mentions` when given)."""
        self.assertEqual(result.returncode, EXIT_USAGE,
                         f"exit {result.returncode}, stdout: {result.stdout[:200]!r}, "
                         f"stderr: {result.stderr!r}")
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, f"stderr should be one line: {result.stderr!r}")
        self.assertTrue(lines[0].strip(), "stderr line is empty")
        if mentions is not None:
            self.assertIn(mentions, lines[0])
