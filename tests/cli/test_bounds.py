"""Bounds a hostile user reaches from the command line: huge thread counts,
split counts, windows and scales, each with a clear answer in well under the
test's timeout (issue 18: items 1, 4 and 5)."""

import os
import time

import numpy as np

from clitest import EXIT_USAGE, CliTestCase, run


class BoundsTest(CliTestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(5)
        for name, shape in (("q", (1, 16, 2, 8)), ("k", (1, 16, 1, 8)), ("v", (1, 16, 1, 8))):
            np.save(os.path.join(self.tmp, name + ".npy"), rng.standard_normal(shape).astype("<f4"))

    def attend(self, *options, out="o.npy"):
        path = os.path.join(self.tmp, out)
        result = run("attend", "--q", os.path.join(self.tmp, "q.npy"),
                     "--k", os.path.join(self.tmp, "k.npy"), "--v", os.path.join(self.tmp, "v.npy"),
                     "--out", path, *options)
        return result, path

    def test_huge_thread_counts_are_refused_at_once(self):
        for threads in ("20000", "100000"):
            started = time.monotonic()
            result, path = self.attend("--threads", threads)
            self.assertEqual(result.returncode, EXIT_USAGE, result.stderr)
            self.assertIn("threads", result.stderr)
            self.assertIn("1024", result.stderr)
            self.assertLess(time.monotonic() - started, 10)
            self.assertFalse(os.path.exists(path))

    def test_split_counts_up_to_int64_max_are_clamped_to_the_keys(self):
        _, reference = self.attend(out="prefill.npy")
        for splits in ("1000000", "9223372036854775807"):
            started = time.monotonic()
            result, path = self.attend("--mode", "split", "--splits", splits)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertLess(time.monotonic() - started, 10)
            np.testing.assert_allclose(np.load(path), np.load(reference), rtol=1e-5, atol=1e-6)

    def test_windows_up_to_int64_max_equal_no_window(self):
        _, reference = self.attend(out="none.npy")
        for window in ("16", "1099511627776", "9223372036854775807"):
            for mode in ("prefill", "decode", "split"):
                result, path = self.attend("--window", window, "--mode", mode)
                self.assertEqual(result.returncode, 0, result.stderr)
                out = np.load(path)
                self.assertGreater(np.abs(out).sum(), 0.0, f"--window {window} zeroed the rows")
                np.testing.assert_allclose(out, np.load(reference), rtol=1e-5, atol=1e-6)

    def test_scores_near_1e10_stay_finite_and_match_the_reference(self):
        for dtype in ("f32", "bf16", "f16"):
            _, reference = self.attend("--scale", "1e9", "--dtype", dtype, "--reference",
                                       out="reference.npy")
            for mode in ("prefill", "decode", "split"):
                result, path = self.attend("--scale", "1e9", "--dtype", dtype, "--mode", mode,
                                           "--lse", os.path.join(self.tmp, "lse.npy"))
                self.assertEqual(result.returncode, 0, result.stderr)
                out = np.load(path)
                self.assertTrue(np.isfinite(out).all(), f"{dtype} {mode}: {np.isnan(out).sum()} NaN")
                self.assertTrue(np.isfinite(np.load(os.path.join(self.tmp, "lse.npy"))).all())
                np.testing.assert_allclose(out, np.load(reference), rtol=1e-2, atol=1e-2,
                                           err_msg=f"{dtype} {mode}")
