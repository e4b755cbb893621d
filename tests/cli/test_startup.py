"""What every `lookback` run costs before its command starts: no OpenBLAS.

OpenBLAS (the benchmark's prefill baseline) starts a thread pool when it
loads. Linked into the binary, it made every command pay for that pool, and
under a tight address-space limit even `lookback --version` spun forever at
exit. Only `lookback bench` may load it, on demand (bench/openblas.hpp)."""

import resource
import shutil
import subprocess
import time

from clitest import CliTestCase, binary, sanitized

# A limit under which OpenBLAS 0.3.21's thread pool cannot start but lookback
# itself runs: 150 MB of address space (`ulimit -v 150000`).
ADDRESS_SPACE_BYTES = 150000 * 1024
# Each command takes milliseconds; a hang is what this catches.
QUICK_S = 10


def linked_libraries():
    """`ldd` of the binary: every shared library it loads at start, its
    dependencies' included."""
    return subprocess.run(["ldd", binary()], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))


class StartupTest(CliTestCase):
    def setUp(self):
        super().setUp()
        if shutil.which("ldd") is None:
            self.skipTest("no ldd on this machine")

    def test_the_binary_does_not_link_openblas(self):
        libraries = linked_libraries()
        self.assertNotIn("openblas", libraries.lower(), libraries)

    def test_commands_run_under_a_small_address_space_limit(self):
        if sanitized():
            self.skipTest("sanitizers reserve far more address space than the limit")
        for args in (["--version"], ["pattern", "--len", "4"]):
            with self.subTest(args=args):
                start = time.monotonic()
                try:
                    result = subprocess.run([binary(), *args], capture_output=True, text=True,
                                            preexec_fn=limit_address_space, timeout=QUICK_S,
                                            check=False)
                except subprocess.TimeoutExpired:
                    self.fail(f"lookback {' '.join(args)} hung under ulimit -v 150000")
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertTrue(result.stdout)
                self.assertLess(time.monotonic() - start, QUICK_S)
