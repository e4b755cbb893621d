"""`mpirun -np P lookback attend --mode ring | sharded-decode`: the CLI across
ranks equals the float64 NumPy attention of tests/cli, and a failing rank
ends the job with one message and exit code 2, never a hang.

CTest sets LOOKBACK_BIN and MPIEXEC (tests/mpi/CMakeLists.txt), and the
Open MPI settings for running as root and oversubscribed."""

import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "cli"))
from test_attend import numpy_attention  # noqa: E402  (the one NumPy oracle)

TIMEOUT_S = 120  # a run that takes longer has hung


def mpirun(ranks, *args):
    command = [os.environ["MPIEXEC"], "-np", str(ranks), os.environ["LOOKBACK_BIN"],
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)


class DistributedAttendTest(unittest.TestCase):
    def setUp(self):
        if not os.environ.get("LOOKBACK_BIN") or not os.environ.get("MPIEXEC"):
            raise unittest.SkipTest("LOOKBACK_BIN or MPIEXEC is not set")
        self.folder = tempfile.TemporaryDirectory()
        self.dir = self.folder.name

    def tearDown(self):
        self.folder.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def save_problem(self, seqlen_q, seqlen_k, seed=0):
        rng = np.random.default_rng(seed)
        self.q = rng.standard_normal((2, seqlen_q, 4, 24)).astype("f4")
        self.k = rng.standard_normal((2, seqlen_k, 2, 24)).astype("f4")
        self.v = rng.standard_normal((2, seqlen_k, 2, 24)).astype("f4")
        self.slopes = (2.0 ** (-8 * np.arange(1, 5) / 4)).astype("f4")
        for name in ("q", "k", "v", "slopes"):
            np.save(self.path(name + ".npy"), getattr(self, name))
        return ["--q", self.path("q.npy"), "--k", self.path("k.npy"), "--v", self.path("v.npy")]

    def test_ring_and_sharded_decode_equal_the_reference(self):
        for mode, seqlen_q, seqlen_k, extra in (
                ("ring", 203, 203, ["--window", "30", "--softcap", "4"]),
                ("ring", 3, 3, []),
                ("sharded-decode", 9, 150, ["--segment", "7", "--window", "60"]),
                ("sharded-decode", 5, 5, ["--dtype", "bf16"])):
            inputs = self.save_problem(seqlen_q, seqlen_k)
            window = int(extra[extra.index("--window") + 1]) if "--window" in extra else None
            softcap = float(extra[extra.index("--softcap") + 1]) if "--softcap" in extra else 0.0
            expected, expected_lse = numpy_attention(self.q, self.k, self.v, window=window,
                                                     softcap=softcap, slopes=self.slopes)
            tolerance = 1e-2 if "--dtype" in extra else 1e-5
            for ranks in (1, 2, 3):
                with self.subTest(mode=mode, seqlen=seqlen_q, ranks=ranks):
                    result = mpirun(ranks, "attend", *inputs, "--alibi", self.path("slopes.npy"),
                                    "--threads", 1, "--mode", mode, *extra,
                                    "--out", self.path("o.npy"), "--lse", self.path("lse.npy"))
                    self.assertEqual(result.returncode, 0, result.stderr)
                    out = np.load(self.path("o.npy"))
                    error = np.linalg.norm(out - expected) / np.linalg.norm(expected)
                    self.assertLessEqual(error, tolerance)
                    lse = np.load(self.path("lse.npy"))
                    self.assertLessEqual(np.abs(lse - expected_lse).max(),
                                         0.05 if tolerance > 1e-5 else 1e-4)

    def single_node(self, *args):
        """`lookback attend` in one process, without mpirun: (out, lse)."""
        command = [os.environ["LOOKBACK_BIN"], "attend", *map(str, args),
                   "--out", self.path("single_o.npy"), "--lse", self.path("single_lse.npy")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                                check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        return np.load(self.path("single_o.npy")), np.load(self.path("single_lse.npy"))

    def assert_agrees(self, out, lse, expected, expected_lse, tolerance=1e-5):
        error = np.linalg.norm(out - expected) / np.linalg.norm(expected)
        self.assertLessEqual(error, tolerance)
        self.assertLessEqual(np.abs(lse - expected_lse).max(), 1e-4)

    def test_sink_logits_agree_with_single_node_attend(self):
        # ring against prefill, sharded-decode against decode: the same function.
        for mode, single_mode, seqlen_q, seqlen_k, extra in (
                ("ring", "prefill", 203, 203, ["--window", "30", "--softcap", "4"]),
                ("ring", "prefill", 3, 3, []),
                ("sharded-decode", "decode", 9, 150, ["--window", "60"])):
            inputs = self.save_problem(seqlen_q, seqlen_k)
            sinks = np.array([0.5, 3.0, -1.0, 2.0], dtype="f4")
            np.save(self.path("sinks.npy"), sinks)
            window = int(extra[extra.index("--window") + 1]) if "--window" in extra else None
            softcap = float(extra[extra.index("--softcap") + 1]) if "--softcap" in extra else 0.0
            oracle, oracle_lse = numpy_attention(self.q, self.k, self.v, window=window,
                                                 softcap=softcap, slopes=self.slopes, sinks=sinks)
            args = [*inputs, "--alibi", self.path("slopes.npy"), "--sink-logits",
                    self.path("sinks.npy"), "--threads", 1, *extra]
            single, single_lse = self.single_node(*args, "--mode", single_mode)
            self.assert_agrees(single, single_lse, oracle, oracle_lse)
            # The sinks matter here: without them the LSE moves far beyond the tolerance.
            _, plain_lse = numpy_attention(self.q, self.k, self.v, window=window,
                                           softcap=softcap, slopes=self.slopes)
            self.assertGreater(np.abs(plain_lse - oracle_lse).max(), 1e-2)
            segment = ["--segment", 7] if mode == "sharded-decode" else []
            for ranks in (1, 2, 3):
                with self.subTest(mode=mode, seqlen=seqlen_q, ranks=ranks):
                    result = mpirun(ranks, "attend", *args, "--mode", mode, *segment,
                                    "--out", self.path("o.npy"), "--lse", self.path("lse.npy"))
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assert_agrees(np.load(self.path("o.npy")), np.load(self.path("lse.npy")),
                                       single, single_lse)

    def test_int8_through_ring_agrees_with_single_node_attend(self):
        inputs = self.save_problem(203, 203)
        args = [*inputs, "--alibi", self.path("slopes.npy"), "--window", "30", "--threads", 1]
        single, single_lse = self.single_node(*args, "--dtype", "int8")
        unquantized, _ = self.single_node(*args)
        # The quantization error lies far beyond the tolerance: --dtype is honoured.
        self.assertGreater(np.linalg.norm(single - unquantized) / np.linalg.norm(unquantized),
                           1e-3)
        for ranks in (1, 2, 3):
            with self.subTest(ranks=ranks):
                result = mpirun(ranks, "attend", *args, "--dtype", "int8", "--mode", "ring",
                                "--out", self.path("o.npy"), "--lse", self.path("lse.npy"))
                self.assertEqual(result.returncode, 0, result.stderr)
                # The same codes on every rank as in one process: f32 tolerances apply.
                self.assert_agrees(np.load(self.path("o.npy")), np.load(self.path("lse.npy")),
                                   single, single_lse)

    def test_a_failing_rank_ends_the_job_with_one_message_and_exit_2(self):
        inputs = self.save_problem(40, 40)
        cases = (
            # rank 0 cannot read an input
            (["--q", self.path("missing.npy")] + inputs[2:], "ring", "missing.npy"),
            # a bad shape, found by rank 0 before any data moves
            (inputs[:4] + ["--v", self.path("q.npy")], "sharded-decode", "v: shape"),
            # the mode's own rule, found by every rank
            (inputs + ["--causal", "top-left"], "sharded-decode", "bottom-right"),
            # the sharded cache stores no 8-bit K/V (refused before K/V move)
            (inputs + ["--dtype", "int8"], "sharded-decode", "--dtype: int8"),
            # the output folder does not exist
            (inputs, "ring", "does not exist"),
        )
        for args, mode, needle in cases:
            for ranks in (1, 3):
                with self.subTest(needle=needle, ranks=ranks):
                    out = self.path("no/such/folder/o.npy" if needle == "does not exist" else "o.npy")
                    result = mpirun(ranks, "attend", *args, "--mode", mode, "--out", out)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    lines = [line for line in result.stderr.splitlines()
                             if line.startswith("lookback:")]
                    self.assertEqual(len(lines), 1, result.stderr)
                    self.assertIn(needle, lines[0])
                    self.assertFalse(os.path.exists(self.path("o.npy")))

    def test_options_of_other_modes_are_refused(self):
        inputs = self.save_problem(8, 8)
        result = mpirun(2, "attend", *inputs, "--mode", "ring", "--segment", 4,
                        "--out", self.path("o.npy"))
        self.assertEqual(result.returncode, 2)
        self.assertIn("--segment", result.stderr)


if __name__ == "__main__":
    unittest.main()
