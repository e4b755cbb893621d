"""`lookback bench`: its help, its argument errors, and one tiny real run whose
json is checked for structure only. Timings are never asserted (DESIGN.md §6:
the machines are shared and noisy)."""

import json
import xml.etree.ElementTree as ElementTree

from clitest import CliTestCase, run

# A run small enough for a test: 2 heads, head_dim 16, one prefill length and
# one decode context (the ceilings' own loops take most of its second or two).
TINY = ["--sizes", "64", "--contexts", "256", "--heads", "2", "--kv-heads", "1", "--dim", "16",
        "--reps", "1"]



def benchmark_built():
    """False for a build with LOOKBACK_BUILD_BENCH=OFF (or without OpenBLAS),
    whose `lookback bench` only says so."""
    return "not built in" not in run("bench", "--help").stdout


class BenchTest(CliTestCase):
    def setUp(self):
        super().setUp()
        if not benchmark_built():
            self.skipTest("lookback was built without the benchmark")

    def run_bench(self, *args):
        return run("bench", *args)

    def test_help_explains(self):
        result = run("bench", "--help")
        self.assert_ok(result)
        for words in ("ceiling", "baseline", "--suite", "--threads", "--dtype", "--quick",
                      "--format", "--out"):
            self.assertIn(words, result.stdout)

    def test_bad_flags_exit_2(self):
        for args, mention in ((["--suite", "train"], "--suite"),
                              (["--threads", "0"], "--threads"),
                              (["--dtype", "f64"], "--dtype"),
                              (["--format", "pdf"], "--format"),
                              (["--sizes", "64,x"], "--sizes"),
                              (["--frobnicate"], "--frobnicate")):
            with self.subTest(args=args):
                self.assert_usage_error(run("bench", *args), mention)

    def test_bad_shapes_exit_2_before_any_work(self):
        for args, mention in ((["--heads", "6", "--kv-heads", "4"], "--kv-heads"),
                              (["--dim", "300"], "--dim")):
            with self.subTest(args=args):
                result = self.run_bench(*args)
                self.assert_usage_error(result, mention)
                self.assertNotIn("[1/", result.stderr)

    def test_tiny_run_json(self):
        out = self.path("bench.json")
        result = self.run_bench("--suite", "all", "--dtype", "all", "--threads", "1",
                                "--format", "json", "--out", out, *TINY)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "")
        # Progress goes to stderr: "[k/m] what ... result".
        progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
        # Four ceilings (FMA, AMX, bf16 dot products, bandwidth), each size's
        # baseline and three dtypes, four ceilings again.
        self.assertEqual(len(progress), 4 + 2 * (1 + 3) + 4)
        self.assertTrue(progress[-1].startswith("[16/16] "))
        self.assertIn("ceiling again: read bandwidth", progress[-1])

        with open(out, encoding="utf-8") as f:
            data = json.load(f)
        self.assertEqual(list(data), ["machine", "settings", "ceilings", "cases"])
        self.assertEqual(data["machine"]["threads"], 1)
        for key in ("cpu", "simd_target", "kernels", "openblas_core"):
            self.assertTrue(data["machine"][key])
        self.assertGreater(data["ceilings"]["fma_gflops"], 0)
        self.assertGreater(data["ceilings"]["read_bandwidth_gbs"], 0)
        self.assertGreaterEqual(data["ceilings"]["amx_bf16_gflops"], 0)
        self.assertGreaterEqual(data["ceilings"]["bf16_dot_gflops"], 0)
        # The baseline's OpenBLAS core is the fastest correct one measured.
        measured = data["machine"]["openblas_cores_measured"]
        if measured:
            correct = [m for m in measured if m["correct"]]
            self.assertTrue(correct)
            fastest = max(correct, key=lambda m: m["sgemm_gflops"])
            self.assertEqual(data["machine"]["openblas_core"], fastest["core"])

        cases = data["cases"]
        seen = {(c["suite"], c["implementation"], c["dtype"]) for c in cases}
        self.assertEqual(seen, {(suite, "baseline", "f32") for suite in ("prefill", "decode")} |
                         {(suite, "lookback", dtype) for suite in ("prefill", "decode")
                          for dtype in ("f32", "bf16", "f16")})
        for c in cases:
            with self.subTest(case=(c["suite"], c["implementation"], c["dtype"])):
                prefill = c["suite"] == "prefill"
                self.assertEqual(c["n" if prefill else "context"], 64 if prefill else 256)
                self.assertEqual((c["heads"], c["kv_heads"], c["head_dim"]), (2, 1, 16))
                self.assertGreater(c["rate"], 0)
                self.assertGreater(c["fraction_of_ceiling"], 0)
                self.assertLessEqual(c["ms"]["min"], c["ms"]["median"])
                self.assertLessEqual(c["ms"]["median"], c["ms"]["max"])
                bytes_per_value = 4 if c["dtype"] == "f32" else 2
                # Useful work: 4 * heads * head_dim * n(n+1)/2 FLOPs, or the KV bytes read.
                self.assertEqual(c["work"], 4 * 2 * 16 * 64 * 65 // 2 if prefill
                                 else 2 * 256 * 1 * 16 * bytes_per_value)
                self.assertEqual(c["rate_unit"], "GFLOP/s" if prefill else "GB/s")
                if c["implementation"] == "lookback":
                    self.assertGreater(c["speedup_vs_baseline"], 0)
                    # The same inputs give the same outputs, within the storage's rounding.
                    self.assertLess(c["rel_l2_vs_baseline"], 1e-5 if c["dtype"] == "f32" else 1e-2)
                else:
                    self.assertNotIn("speedup_vs_baseline", c)

    def test_tiny_run_text_and_svg(self):
        result = self.run_bench("--suite", "decode", "--threads", "1", *TINY)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("ceilings at 1 thread (the higher of a measurement before and after the cases):",
                      result.stdout)
        self.assertIn("context=256 lookback f32", result.stdout)
        self.assertIn("context=256 baseline f32", result.stdout)
        self.assertNotIn("causal prefill", result.stdout)
        svg = self.path("bench.svg")
        result = self.run_bench("--suite", "prefill", "--threads", "1", "--format", "svg",
                                "--out", svg, *TINY)
        self.assertEqual(result.returncode, 0, result.stderr)
        root = ElementTree.parse(svg).getroot()
        self.assertTrue(root.tag.endswith("svg"))
        texts = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
        self.assertIn("FMA peak", texts)
        self.assertIn("baseline", texts)
        self.assertIn("lookback f32", texts)


class BenchNotBuiltTest(CliTestCase):
    def test_says_it_was_not_built(self):
        if benchmark_built():
            self.skipTest("lookback was built with the benchmark")
        self.assert_usage_error(run("bench", "--quick"),
                                "built without the benchmark (LOOKBACK_BUILD_BENCH=OFF)")
