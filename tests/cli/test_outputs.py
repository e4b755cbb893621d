"""Where every writer puts its output (include/lookback/output_file.hpp): a
regular file is replaced atomically, a symlink's target is replaced and the
link stays, a device node or FIFO is written in place, `-` is standard
output, and an empty path is an error naming the option. Inputs that are not
regular files (a FIFO) fail at once instead of hanging in open()."""

import io
import os
import stat
import subprocess
import threading
import unittest

import numpy as np

from clitest import EXIT_OK, CliTestCase, binary, fixture

# A run that takes longer than this is hanging (each command here takes a
# fraction of a second).
HANG_S = 20

OUT = "{out}"  # placeholder for the output path in a writer's arguments


def run_bytes(*args, cwd=None, timeout=HANG_S):
    """Runs `lookback ARGS...` with binary stdout; fails the test (instead of
    waiting for ever) when it hangs."""
    try:
        return subprocess.run([binary(), *map(str, args)], capture_output=True, cwd=cwd,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"lookback {' '.join(map(str, args))} hung for {timeout} s")


class FifoReader:
    """Reads everything a writer sends into a FIFO, on a thread (opening a
    FIFO for reading blocks until a writer comes)."""

    def __init__(self, path):
        self.path = path
        self.data = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as fifo:
            self.data = fifo.read()

    def finish(self):
        """The bytes read; None when no writer ever opened the FIFO."""
        self.thread.join(HANG_S)
        if self.thread.is_alive():
            # Nobody wrote: open and close a write end to release the reader.
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            self.thread.join(HANG_S)
            return None
        return self.data


class OutputPathTest(CliTestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(3)
        self.kv = self.path("kv.npy")
        np.save(self.kv, rng.standard_normal((5, 2, 8)).astype(np.float32))
        attend = ["attend", "--q", fixture("q_1x7x2x8.npy"), "--k", fixture("k_1x7x1x8.npy"),
                  "--v", fixture("v_1x7x1x8.npy")]
        # Every writer that takes an output path, as name -> arguments.
        self.writers = {
            "pattern": ["pattern", "--len", 4, "--format", "svg", "--out", OUT],
            "cost": ["cost", "--len", 3, "--heads", 2, "--kv-heads", 1, "--dim", 8, "--out", OUT],
            "leakcheck": ["leakcheck", "--len", 4, "--heads", 2, "--kv-heads", 1, "--dim", 8,
                          "--out", OUT],
            "attend --out": attend + ["--out", OUT],
            "attend --lse": attend + ["--out", self.path("o_beside.npy"), "--lse", OUT],
            "cache save": ["cache", "save", "--k", self.kv, "--v", self.kv, "--out", OUT],
        }

    def write(self, name, out):
        """Runs writer `name` with its output at `out`; returns the result."""
        return run_bytes(*[out if a == OUT else a for a in self.writers[name]], cwd=self.tmp)

    def expected(self, name):
        """What writer `name` writes to a regular file."""
        out = self.path("reference.out")
        result = self.write(name, out)
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        with open(out, "rb") as f:
            data = f.read()
        os.remove(out)
        self.assertTrue(data)
        return data

    def assert_no_temporaries(self, *folders):
        for folder in folders:
            self.assertEqual([n for n in os.listdir(folder) if ".tmp." in n], [], folder)

    def test_dash_is_standard_output(self):
        for name in self.writers:
            with self.subTest(writer=name):
                expected = self.expected(name)
                result = self.write(name, "-")
                self.assertEqual(result.returncode, EXIT_OK, result.stderr)
                self.assertEqual(result.stderr, b"")
                self.assertEqual(result.stdout, expected)
                self.assertFalse(os.path.exists(self.path("-")))
        # Binary .npy on stdout loads as the array written to a file.
        result = self.write("attend --out", "-")
        out = self.path("o.npy")
        self.write("attend --out", out)
        np.testing.assert_array_equal(np.load(out), np.load(io.BytesIO(result.stdout)))

    def test_symlink_keeps_being_a_link_and_its_target_gets_the_content(self):
        os.mkdir(self.path("sub"))
        for index, name in enumerate(self.writers):
            with self.subTest(writer=name):
                expected = self.expected(name)
                target = self.path(f"sub/target{index}")
                with open(target, "wb") as f:
                    f.write(b"previous contents")
                os.chmod(target, 0o640)
                link = self.path(f"link{index}")
                os.symlink(f"sub/target{index}", link)  # relative: resolved from the link's folder
                result = self.write(name, link)
                self.assertEqual(result.returncode, EXIT_OK, result.stderr)
                self.assertTrue(os.path.islink(link))
                self.assertEqual(os.readlink(link), f"sub/target{index}")
                with open(target, "rb") as f:
                    self.assertEqual(f.read(), expected)
                self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o640)
                self.assert_no_temporaries(self.tmp, self.path("sub"))

    def test_dangling_symlink_creates_its_target(self):
        link = self.path("link")
        os.symlink("new.svg", link)
        result = self.write("pattern", link)
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        self.assertTrue(os.path.islink(link))
        with open(self.path("new.svg"), "rb") as f:
            self.assertEqual(f.read(), self.expected("pattern"))

    def test_fifo_is_written_in_place(self):
        for index, name in enumerate(self.writers):
            with self.subTest(writer=name):
                expected = self.expected(name)
                fifo = self.path(f"fifo{index}")
                os.mkfifo(fifo)
                reader = FifoReader(fifo)
                result = self.write(name, fifo)
                got = reader.finish()
                self.assertEqual(result.returncode, EXIT_OK, result.stderr)
                self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced")
                self.assertEqual(got, expected, "the FIFO's reader did not get the output")
                self.assert_no_temporaries(self.tmp)

    def test_character_device_is_written_in_place(self):
        # A private copy of /dev/null (char 1, 3): the real one must never be
        # at risk if the fix regressed.
        if os.geteuid() != 0:
            self.skipTest("creating a device node (mknod) needs root")
        null = self.path("null")
        try:
            os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError as e:
            self.skipTest(f"mknod is not permitted here: {e}")
        for name in self.writers:
            with self.subTest(writer=name):
                result = self.write(name, null)
                self.assertEqual(result.returncode, EXIT_OK, result.stderr)
                info = os.lstat(null)
                self.assertTrue(stat.S_ISCHR(info.st_mode), "the device node was replaced")
                self.assertEqual(info.st_rdev, os.makedev(1, 3))
                self.assert_no_temporaries(self.tmp)

    def test_empty_path_is_an_error_naming_the_option(self):
        for name in self.writers:
            with self.subTest(writer=name):
                result = self.write(name, "")
                option = "--lse" if name == "attend --lse" else "--out"
                self.assert_usage_error(run_text(result), mentions=f"{option}: empty path")

    def test_out_and_lse_on_one_file_is_an_error(self):
        out = self.path("o.npy")
        with open(out, "wb") as f:
            f.write(b"previous contents")
        os.symlink("o.npy", self.path("o_link.npy"))
        for lse in (out, os.path.join(self.tmp, ".", "o.npy"), self.path("o_link.npy")):
            with self.subTest(lse=lse):
                result = run_bytes(*self.writers["attend --out"][:-1], out, "--lse", lse,
                                   cwd=self.tmp)
                self.assert_usage_error(run_text(result), mentions="the same file as --out")
                with open(out, "rb") as f:
                    self.assertEqual(f.read(), b"previous contents")
        result = run_bytes(*self.writers["attend --out"][:-1], "-", "--lse", "-", cwd=self.tmp)
        self.assert_usage_error(run_text(result), mentions="--lse -")

    def test_help_says_dash_is_standard_output(self):
        for command in (["pattern"], ["cost"], ["leakcheck"], ["attend"], ["cache", "save"]):
            with self.subTest(command=command):
                result = run_bytes(*command, "--help")
                self.assertEqual(result.returncode, EXIT_OK)
                help_text = " ".join(result.stdout.decode().split())
                self.assertRegex(help_text, r"--out [^-]*- (is stdout|for standard output)")


class BlockingInputTest(CliTestCase):
    """A FIFO given as an input is refused at once: open() of a FIFO with no
    writer would block for ever."""

    def test_fifo_inputs_fail_fast(self):
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        npy = [fixture("q_1x7x2x8.npy"), fixture("k_1x7x1x8.npy"), fixture("v_1x7x1x8.npy")]
        cases = {
            "attend --q": ["attend", "--q", fifo, "--k", npy[1], "--v", npy[2],
                           "--out", self.path("o.npy")],
            "attend --alibi": ["attend", "--q", npy[0], "--k", npy[1], "--v", npy[2],
                               "--alibi", fifo, "--out", self.path("o.npy")],
            "cache save --k": ["cache", "save", "--k", fifo, "--v", npy[1],
                               "--out", self.path("c.lbkv")],
            "cache inspect": ["cache", "inspect", fifo],
        }
        for name, args in cases.items():
            with self.subTest(case=name):
                result = run_bytes(*args, cwd=self.tmp)
                self.assert_usage_error(run_text(result), mentions="not a regular file")
                self.assertIn(fifo, result.stderr.decode())
        self.assertFalse(os.path.exists(self.path("o.npy")))


def run_text(result):
    """A bytes CompletedProcess as the text one that assert_usage_error reads."""
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode("utf-8", "replace"),
                                       result.stderr.decode("utf-8", "replace"))


if __name__ == "__main__":
    unittest.main()
