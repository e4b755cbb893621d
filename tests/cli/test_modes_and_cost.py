"""`lookback attend --mode ...`: every path computes what prefill computes;
`lookback cost`: the cost per generated token."""

import json
import xml.etree.ElementTree as ElementTree

import numpy as np

from clitest import CliTestCase, run
from test_attend import numpy_attention, rel_l2


class ModesTest(CliTestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(3)
        self.q = rng.standard_normal((2, 11, 4, 20)).astype(np.float32)
        self.k = rng.standard_normal((2, 30, 2, 20)).astype(np.float32)
        self.v = rng.standard_normal((2, 30, 2, 20)).astype(np.float32)
        self.paths = []
        for name, array in (("q", self.q), ("k", self.k), ("v", self.v)):
            path = self.path(name + ".npy")
            np.save(path, array)
            self.paths.append(path)

    def attend(self, *extra):
        out, lse = self.path("o.npy"), self.path("lse.npy")
        result = run("attend", "--q", self.paths[0], "--k", self.paths[1], "--v", self.paths[2],
                     "--out", out, "--lse", lse, *extra)
        return result, out, lse

    def test_every_mode_matches_numpy(self):
        expected, expected_lse = numpy_attention(self.q, self.k, self.v, window=7)
        for extra in (["--mode", "prefill"], ["--mode", "decode"],
                      ["--mode", "chunked", "--chunk", "4"],
                      ["--mode", "paged", "--block-size", "3"],
                      ["--mode", "paged", "--block-size", "16", "--chunk", "5"],
                      ["--mode", "split", "--splits", "4"]):
            with self.subTest(extra=extra):
                result, out, lse = self.attend("--window", "7", *extra)
                self.assert_ok(result)
                self.assertLess(rel_l2(np.load(out), expected), 1e-5)
                np.testing.assert_allclose(np.load(lse), expected_lse, atol=1e-4)

    def test_mode_errors(self):
        cases = [
            (["--mode", "decode", "--causal", "top-left"], "bottom-right"),
            (["--mode", "chunked"], "--chunk"),
            (["--mode", "chunked", "--chunk", "0"], "--chunk"),
            (["--mode", "paged", "--block-size", "0"], "--block-size"),
            (["--mode", "split", "--splits", "0"], "--splits"),
            (["--mode", "teleport"], "--mode"),
            # Options that another mode would silently ignore.
            (["--chunk", "4"], "--chunk 4: --mode prefill does not use it"),
            (["--mode", "decode", "--chunk", "1"], "--chunk 1: --mode decode does not use it"),
            (["--mode", "split", "--chunk", "2"], "--chunk 2: --mode split does not use it"),
            (["--block-size", "8"], "--block-size 8: --mode prefill does not use it"),
            (["--mode", "chunked", "--chunk", "3", "--block-size", "8"],
             "--block-size 8: --mode chunked does not use it"),
            (["--mode", "paged", "--splits", "3"], "--splits 3: --mode paged does not use it"),
        ]
        for extra, mention in cases:
            with self.subTest(extra=extra):
                result, out, _ = self.attend(*extra)
                self.assert_usage_error(result, mention)


class CostTest(CliTestCase):
    def test_position_five_attends_six_keys(self):
        result = run("cost", "--len", "8")
        self.assert_ok(result)
        rows = [line.split() for line in result.stdout.splitlines()]
        row5 = next(r for r in rows if r[:1] == ["5"])
        self.assertEqual(row5[1], "6")

    def test_json_counts_and_window(self):
        result = run("cost", "--len", "10", "--heads", "4", "--kv-heads", "2", "--dim", "8",
                     "--window", "3", "--dtype", "bf16", "--format", "json")
        self.assert_ok(result)
        data = json.loads(result.stdout)
        keys = [p["keys"] for p in data["positions"]]
        self.assertEqual(keys, [1, 2, 3, 4, 4, 4, 4, 4, 4, 4])
        p9 = data["positions"][9]
        self.assertEqual(p9["flops_cached"], 4 * 4 * 8 * 4)
        self.assertEqual(p9["kv_bytes"], 2 * 2 * 8 * 2 * 4)  # K and V, 2 kv heads, bf16
        # Without a cache, token 9 recomputes every visible pair of the 10 x 10 square.
        self.assertEqual(p9["flops_uncached"], 4 * 4 * 8 * sum(keys))
        self.assertEqual(data["totals"]["tokens"], 10)

    def test_8bit_kv_bytes_count_the_scales(self):
        for dtype in ("int8", "fp8e4m3", "fp8e5m2"):
            with self.subTest(dtype=dtype):
                result = run("cost", "--len", "10", "--heads", "4", "--kv-heads", "2", "--dim", "8",
                             "--dtype", dtype, "--format", "json")
                self.assert_ok(result)
                p9 = json.loads(result.stdout)["positions"][9]
                # K and V, 2 kv heads, 8 one-byte codes and a 4-byte scale per row, 10 keys.
                self.assertEqual(p9["kv_bytes"], 2 * 2 * (8 + 4) * 10)

    def test_measure_and_svg(self):
        result = run("cost", "--len", "40", "--heads", "4", "--kv-heads", "2", "--dim", "16",
                     "--measure", "--format", "json")
        self.assert_ok(result)
        data = json.loads(result.stdout)
        self.assertTrue(all(p["measured_ns"] > 0 for p in data["positions"]))
        svg = self.path("cost.svg")
        result = run("cost", "--len", "200", "--format", "svg", "--out", svg)
        self.assert_ok(result)
        self.assertEqual(result.stdout, "")
        root = ElementTree.parse(svg).getroot()
        self.assertTrue(root.tag.endswith("svg"))

    def test_sink_tokens_counts_by_hand(self):
        # --len 12 --window 3 --sink-tokens 2: position i sees keys i-3..i and
        # the sinks 0, 1 below that window. i = 4 adds key 0; i >= 5 adds 0 and 1.
        result = run("cost", "--len", "12", "--heads", "4", "--kv-heads", "2", "--dim", "8",
                     "--window", "3", "--sink-tokens", "2", "--format", "json")
        self.assert_ok(result)
        data = json.loads(result.stdout)
        self.assertEqual(data["window"], 3)
        self.assertEqual(data["sink_tokens"], 2)
        keys = [p["keys"] for p in data["positions"]]
        self.assertEqual(keys, [1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6])
        per_key = 4 * 4 * 8  # FLOPs: 4 * heads * head_dim
        p11 = data["positions"][11]
        self.assertEqual(p11["flops_cached"], per_key * 6)
        self.assertEqual(p11["kv_bytes"], 2 * 2 * 8 * 4 * 6)  # K and V, 2 kv heads, f32
        self.assertEqual(p11["flops_uncached"], per_key * sum(keys))
        self.assertEqual(data["totals"]["flops_cached"], per_key * sum(keys))
        # Without sinks the same window sees 4 keys from position 3 on.
        plain = json.loads(run("cost", "--len", "12", "--window", "3", "--format", "json").stdout)
        self.assertEqual(plain["sink_tokens"], 0)
        self.assertEqual([p["keys"] for p in plain["positions"]][4:], [4] * 8)

    def test_sink_tokens_text_svg_and_measure(self):
        result = run("cost", "--len", "12", "--window", "3", "--sink-tokens", "2")
        self.assert_ok(result)
        self.assertIn("window 3, 2 sink tokens", result.stdout.splitlines()[0])
        rows = {r[0]: r[1] for r in (line.split() for line in result.stdout.splitlines())
                if len(r) > 1 and r[0].isdigit()}
        self.assertEqual(rows["4"], "5")
        self.assertEqual(rows["11"], "6")
        svg = self.path("sinks.svg")
        self.assert_ok(run("cost", "--len", "12", "--window", "3", "--sink-tokens", "2",
                           "--format", "svg", "--out", svg))
        with open(svg, encoding="utf-8") as file:
            self.assertIn("2 sink tokens", file.read())
        result = run("cost", "--len", "30", "--heads", "4", "--kv-heads", "2", "--dim", "16",
                     "--window", "4", "--sink-tokens", "3", "--measure", "--format", "json")
        self.assert_ok(result)
        data = json.loads(result.stdout)
        self.assertTrue(all(p["measured_ns"] > 0 for p in data["positions"]))
        self.assertEqual(data["positions"][29]["keys"], 8)

    def test_sink_token_errors(self):
        self.assert_usage_error(run("cost", "--len", "12", "--sink-tokens", "2"),
                                "--sink-tokens: 2 without --window")
        self.assert_usage_error(run("cost", "--len", "12", "--window", "3", "--sink-tokens", "-1"),
                                "--sink-tokens")
        self.assert_usage_error(run("cost", "--context", "64", "--ranks", "2", "--window", "3",
                                    "--sink-tokens", "2"), "--sink-tokens: 2 not with --ranks")

    def test_errors(self):
        for args, mention in ((["--len", "0"], "--len"),
                              (["--len", "8", "--heads", "6", "--kv-heads", "4"], "--kv-heads"),
                              (["--len", "8", "--dtype", "f64"], "--dtype"),
                              (["--len", "8", "--format", "pdf"], "--format")):
            with self.subTest(args=args):
                self.assert_usage_error(run("cost", *args), mention)
