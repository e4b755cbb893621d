"""`lookback attend`: attention on .npy files, checked against a float64
NumPy computation written here, and every error case a user can hit."""

import os
import unittest

import numpy as np

from clitest import CliTestCase, fixture, run, run_measured


def numpy_attention(q, k, v, causal="bottom-right", window=None, scale=None,
                    softcap=0.0, slopes=None, sinks=None, sink_tokens=0):
    """DESIGN.md §3 in float64, written independently of the C++ reference."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, sq, heads, dim = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    out = np.zeros_like(q)
    lse = np.full((batch, heads, sq), -np.inf)
    offset = 0 if causal == "top-left" else sk - sq
    for b in range(batch):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            s = scale * q[b, :, h, :] @ k[b, :, kh, :].T
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            pos = np.arange(sq)[:, None] + offset
            keys = np.arange(sk)[None, :]
            if slopes is not None:
                s = s - slopes[h] * np.abs(pos - keys)
            visible = np.ones((sq, sk), dtype=bool)
            if causal != "none":
                visible = keys <= pos
                if window is not None:
                    # StreamingLLM: keys below sink_tokens stay visible.
                    visible &= (keys >= pos - window) | (keys < sink_tokens)
            for i in range(sq):
                row = s[i][visible[i]]
                if row.size == 0:
                    if sinks is not None:
                        lse[b, h, i] = sinks[h]
                    continue
                m = row.max() if sinks is None else max(row.max(), sinks[h])
                p = np.exp(row - m)
                total = p.sum() + (0.0 if sinks is None else np.exp(sinks[h] - m))
                out[b, i, h] = (p / total) @ v[b, visible[i], kh, :]
                lse[b, h, i] = m + np.log(total)
    return out, lse


def fp8_values(exponent_bits):
    """Every non-negative finite value of an OCP fp8 format, by code."""
    mantissa_bits = 7 - exponent_bits
    bias = 2 ** (exponent_bits - 1) - 1
    values = []
    for code in range(128):
        field, mantissa = code >> mantissa_bits, code & (2 ** mantissa_bits - 1)
        if exponent_bits == 4 and code == 0x7F:
            break  # e4m3fn: the only NaN; no infinities
        if exponent_bits == 5 and field == 31:
            break  # e5m2: infinities and NaNs
        fraction = mantissa / 2 ** mantissa_bits
        values.append(fraction * 2.0 ** (1 - bias) if field == 0
                      else (1 + fraction) * 2.0 ** (field - bias))
    return np.array(values)


def quantize_kv(x, dtype):
    """The 8-bit rule of docs/semantics.md, in NumPy, per (.., token, kv head)
    row of head_dim values: what the kernels must attend to."""
    x = np.asarray(x, np.float32)
    limit = {"int8": 127, "fp8e4m3": 448, "fp8e5m2": 57344}[dtype]
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(limit)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    r = (x / safe).astype(np.float32)
    if dtype == "int8":
        codes = np.clip(np.rint(r), -127, 127)  # rint: ties to even
    else:
        table = fp8_values(4 if dtype == "fp8e4m3" else 5)
        a = np.minimum(np.abs(r).astype(np.float64), table[-1])
        index = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
        low, high = table[index - 1], table[index]
        pick_high = (high - a < a - low) | ((high - a == a - low) & (index % 2 == 0))
        codes = np.sign(r) * np.where(pick_high, high, low)
    return np.where(scale == 0, np.float32(0), codes.astype(np.float32) * scale).astype(np.float32)


def sparse_npy(path, shape):
    """A <f4 .npy file of `shape` whose data is a hole (f.truncate): its
    header claims gigabytes that cost no disk."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.truncate(f.tell() + 4 * int(np.prod(shape)))
    return path


def rel_l2(actual, expected):
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


class AttendTest(CliTestCase):
    def save(self, name, array):
        path = self.path(name)
        np.save(path, array)
        return path

    def random_inputs(self, batch=2, sq=9, sk=13, heads=4, kv_heads=2, dim=24, dtype=np.float32):
        rng = np.random.default_rng(7)
        q = rng.standard_normal((batch, sq, heads, dim)).astype(dtype)
        k = rng.standard_normal((batch, sk, kv_heads, dim)).astype(dtype)
        v = rng.standard_normal((batch, sk, kv_heads, dim)).astype(dtype)
        return q, k, v

    def attend(self, q, k, v, *extra):
        paths = [self.save(n, x) for n, x in (("q.npy", q), ("k.npy", k), ("v.npy", v))]
        out, lse = self.path("o.npy"), self.path("lse.npy")
        result = run("attend", "--q", paths[0], "--k", paths[1], "--v", paths[2],
                     "--out", out, "--lse", lse, *extra)
        return result, out, lse

    def test_fixture_matches_numpy(self):
        q, k, v = (np.load(fixture(n)) for n in
                   ("q_1x7x2x8.npy", "k_1x7x1x8.npy", "v_1x7x1x8.npy"))
        out = self.path("o.npy")
        result = run("attend", "--q", fixture("q_1x7x2x8.npy"), "--k", fixture("k_1x7x1x8.npy"),
                     "--v", fixture("v_1x7x1x8.npy"), "--out", out)
        self.assert_ok(result)
        self.assertEqual(result.stdout, "")
        o = np.load(out)
        self.assertEqual(o.dtype, np.dtype("<f4"))
        self.assertEqual(o.shape, (1, 7, 2, 8))
        expected, _ = numpy_attention(q, k, v)
        self.assertLess(rel_l2(o, expected), 1e-5)

    def test_options_match_numpy(self):
        q, k, v = self.random_inputs()
        slopes = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
        alibi = self.save("slopes.npy", slopes)
        cases = [
            ([], {}),
            (["--causal", "top-left"], {"causal": "top-left"}),
            (["--causal", "none"], {"causal": "none"}),
            (["--window", "3"], {"window": 3}),
            (["--window", "0"], {"window": 0}),
            (["--softcap", "2.5"], {"softcap": 2.5}),
            (["--scale", "0.3"], {"scale": 0.3}),
            (["--alibi", alibi], {"slopes": slopes.astype(np.float64)}),
        ]
        for args, kwargs in cases:
            with self.subTest(args=args):
                result, out, lse = self.attend(q, k, v, *args)
                self.assert_ok(result)
                expected_out, expected_lse = numpy_attention(q, k, v, **kwargs)
                self.assertLess(rel_l2(np.load(out), expected_out), 1e-5)
                got_lse = np.load(lse)
                self.assertEqual(got_lse.shape, (2, 4, 9))
                finite = np.isfinite(expected_lse)
                np.testing.assert_array_equal(np.isneginf(got_lse), ~finite)
                np.testing.assert_allclose(got_lse[finite], expected_lse[finite], atol=1e-4)

    def test_empty_rows_are_zero_with_minus_inf_lse(self):
        q, k, v = self.random_inputs(batch=1, sq=6, sk=3)
        result, out, lse = self.attend(q, k, v)
        self.assert_ok(result)
        o, l = np.load(out), np.load(lse)
        # seqlen_q 6 > seqlen_k 3, bottom-right: rows 0..2 see no key.
        self.assertTrue(np.all(o[0, :3] == 0))
        self.assertTrue(np.all(np.isneginf(l[0, :, :3])))
        self.assertFalse(np.isnan(o).any())

    def test_half_and_double_inputs(self):
        for dtype in (np.float16, np.float64):
            with self.subTest(dtype=dtype):
                q, k, v = self.random_inputs(dtype=dtype)
                result, out, _ = self.attend(q, k, v)
                self.assert_ok(result)
                expected, _ = numpy_attention(q, k, v)
                self.assertLess(rel_l2(np.load(out), expected), 1e-5)

    def test_half_storage(self):
        q, k, v = self.random_inputs()
        for dtype in ("bf16", "f16"):
            with self.subTest(dtype=dtype):
                result, out, _ = self.attend(q, k, v, "--dtype", dtype)
                self.assert_ok(result)
                expected, _ = numpy_attention(q, k, v)
                self.assertLess(rel_l2(np.load(out), expected), 1e-2)

    def test_8bit_kv_storage_on_every_path(self):
        # Against NumPy on the K and V quantized here, by the rule; and the
        # cost of 8 bits against unquantized K and V.
        q, k, v = self.random_inputs(batch=1, sq=9, sk=40, heads=4, kv_heads=2, dim=24)
        exact, _ = numpy_attention(q, k, v)
        for dtype, bound in (("int8", 3e-2), ("fp8e4m3", 8e-2), ("fp8e5m2", 0.2)):
            expected, expected_lse = numpy_attention(q, quantize_kv(k, dtype), quantize_kv(v, dtype))
            for mode, extra in (("prefill", []), ("decode", []), ("chunked", ["--chunk", "4"]),
                                ("paged", ["--chunk", "4", "--block-size", "3"]),
                                ("split", ["--splits", "3"])):
                with self.subTest(dtype=dtype, mode=mode):
                    result, out, lse = self.attend(q, k, v, "--dtype", dtype, "--mode", mode,
                                                   *extra)
                    self.assert_ok(result)
                    o = np.load(out)
                    self.assertFalse(np.isnan(o).any())
                    self.assertLess(rel_l2(o, expected), 1e-4)
                    np.testing.assert_allclose(np.load(lse), expected_lse, atol=1e-4)
                    self.assertLess(rel_l2(o, exact), bound)
                    self.assertGreater(rel_l2(o, exact), 1e-5)

    def test_sink_tokens_on_every_path(self):
        # StreamingLLM: keys 0..S-1 stay visible beside the window W.
        q, k, v = self.random_inputs(batch=2, sq=9, sk=30, heads=4, kv_heads=2, dim=24)
        without, _ = numpy_attention(q, k, v, window=4)
        for dtype, tolerance in (("f32", 1e-5), ("bf16", 1e-2), ("int8", 1e-4)):
            kq, vq = (quantize_kv(k, dtype), quantize_kv(v, dtype)) if dtype == "int8" else (k, v)
            expected, expected_lse = numpy_attention(q, kq, vq, window=4, sink_tokens=3)
            self.assertGreater(rel_l2(expected, without), 0.1)  # the sinks matter
            for mode, extra in (("prefill", []), ("decode", []), ("chunked", ["--chunk", "4"]),
                                ("paged", ["--chunk", "4", "--block-size", "3"]),
                                ("split", ["--splits", "3"]),
                                # rings of 3 + 4 + chunk slots: they wrap many times
                                ("decode", ["--ring-cache"]),
                                ("chunked", ["--chunk", "2", "--ring-cache"])):
                with self.subTest(dtype=dtype, mode=mode, extra=extra):
                    result, out, lse = self.attend(q, k, v, "--window", "4", "--sink-tokens", "3",
                                                   "--dtype", dtype, "--mode", mode, *extra)
                    self.assert_ok(result)
                    o = np.load(out)
                    self.assertFalse(np.isnan(o).any())
                    self.assertLess(rel_l2(o, expected), tolerance)
                    np.testing.assert_allclose(np.load(lse), expected_lse,
                                               atol=1e-4 if dtype != "bf16" else 5e-2)
        os.remove(self.path("o.npy"))
        result, out, _ = self.attend(q, k, v, "--sink-tokens", "3")
        self.assert_usage_error(result, mentions="--sink-tokens")
        self.assertFalse(os.path.exists(out))
        for extra, mentions in ((["--mode", "decode"], "--ring-cache: without --window"),
                                (["--window", "4"], "--ring-cache: --mode prefill")):
            result, out, _ = self.attend(q, k, v, "--ring-cache", *extra)
            self.assert_usage_error(result, mentions=mentions)
            self.assertFalse(os.path.exists(out))

    def test_sink_logits_on_every_path(self):
        q, k, v = self.random_inputs(batch=1, sq=12, sk=8, heads=4, kv_heads=2, dim=24)
        sinks = np.array([0.5, -1.0, 2.0, 3.5], np.float32)
        path = self.save("sinks.npy", sinks)
        expected, expected_lse = numpy_attention(q, k, v, sinks=sinks)
        for mode, extra in (("prefill", []), ("split", ["--splits", "3"])):
            with self.subTest(mode=mode):
                result, out, lse = self.attend(q, k, v, "--sink-logits", path, "--mode", mode, *extra)
                self.assert_ok(result)
                self.assertLess(rel_l2(np.load(out), expected), 1e-5)
                np.testing.assert_allclose(np.load(lse), expected_lse, atol=1e-5)
        # The first sq - sk rows see no key: zeros and lse = the sink.
        self.assertTrue((np.load(lse)[0, :, :4] == sinks[:, None]).all())
        q2, k2, v2 = self.random_inputs(batch=1, sq=5, sk=30, heads=4, kv_heads=2, dim=24)
        expected, _ = numpy_attention(q2, k2, v2, window=6, sinks=sinks)
        for mode, extra in (("decode", []), ("paged", ["--chunk", "2", "--block-size", "4"])):
            with self.subTest(mode=mode):
                result, out, _ = self.attend(q2, k2, v2, "--sink-logits", path, "--window", "6",
                                             "--mode", mode, *extra)
                self.assert_ok(result)
                self.assertLess(rel_l2(np.load(out), expected), 1e-5)
        wrong = self.save("sinks3.npy", sinks[:3])
        result, _, _ = self.attend(q, k, v, "--sink-logits", wrong)
        self.assert_usage_error(result, mentions="--sink-logits")

    def test_varlen_packed_batch(self):
        # Lengths 1, 7, 300 and 0, seqlen_q != seqlen_k, against NumPy per sequence.
        rng = np.random.default_rng(7)
        lengths = [(1, 1), (7, 7), (0, 3), (300, 300), (5, 40), (2, 0)]
        cu_q = np.cumsum([0] + [a for a, _ in lengths])
        cu_k = np.cumsum([0] + [b for _, b in lengths])
        q = rng.standard_normal((cu_q[-1], 4, 24)).astype(np.float32)
        k = rng.standard_normal((cu_k[-1], 2, 24)).astype(np.float32)
        v = rng.standard_normal((cu_k[-1], 2, 24)).astype(np.float32)
        paths = {n: self.save(n + ".npy", x) for n, x in
                 (("q", q), ("k", k), ("v", v), ("cu_q", cu_q.astype(np.int32)),
                  ("cu_k", cu_k.astype(np.int64)))}
        out, lse = self.path("o.npy"), self.path("lse.npy")
        base = ["attend", "--q", paths["q"], "--k", paths["k"], "--v", paths["v"],
                "--cu-seqlens-q", paths["cu_q"], "--cu-seqlens-k", paths["cu_k"], "--out", out]
        for window in (None, 5):
            with self.subTest(window=window):
                extra = [] if window is None else ["--window", str(window)]
                result = run(*base, "--lse", lse, *extra)
                self.assert_ok(result)
                o, l = np.load(out), np.load(lse)
                self.assertEqual(o.shape, q.shape)
                self.assertEqual(l.shape, (4, cu_q[-1]))
                for b, (sq, sk) in enumerate(lengths):
                    if sq == 0:
                        continue
                    qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
                    expected, expected_lse = numpy_attention(q[None, qs], k[None, ks], v[None, ks],
                                                             window=window)
                    np.testing.assert_allclose(o[qs], expected[0], atol=2e-5)
                    np.testing.assert_array_equal(np.isinf(l[:, qs]), np.isinf(expected_lse[0]))
        bad = {"down": [0, 5, 3, 300, 310, 312, 320], "start": [1, 1, 8, 8, 308, 313, 315],
               "end": [0, 1, 8, 8, 308, 313, 314], "negative": [0, -1, 8, 8, 308, 313, 315],
               "length": [0, 8, 315]}
        for name, values in bad.items():
            with self.subTest(bad=name):
                path = self.save("bad_" + name + ".npy", np.array(values, np.int64))
                args = list(base)
                args[args.index("--cu-seqlens-q") + 1] = path
                self.assert_usage_error(run(*args), mentions="cu_seqlens_q" if name != "length" else "cu_seqlens")
        self.assert_usage_error(run(*base, "--mode", "decode"), mentions="--mode")
        floats = self.save("cu_f.npy", cu_q.astype(np.float32))
        args = list(base)
        args[args.index("--cu-seqlens-q") + 1] = floats
        self.assert_usage_error(run(*args), mentions="cu_f.npy")

    def test_reference_flag_and_threads_agree(self):
        q, k, v = self.random_inputs(sq=70, sk=70, dim=40)
        outputs = []
        for extra in (["--threads", "1"], ["--threads", "3"], ["--reference"]):
            result, out, _ = self.attend(q, k, v, *extra)
            self.assert_ok(result)
            outputs.append(np.load(out))
        np.testing.assert_array_equal(outputs[0], outputs[1])  # bitwise, any thread count
        self.assertLess(rel_l2(outputs[0], outputs[2].astype(np.float64)), 1e-5)

    def test_nan_input_does_not_crash(self):
        q, k, v = self.random_inputs(batch=1)
        q[0, 5, 0, 0] = np.nan
        result, out, _ = self.attend(q, k, v)
        self.assert_ok(result)
        o = np.load(out)
        self.assertTrue(np.isnan(o[0, 5, 0]).all())
        self.assertFalse(np.isnan(o[0, :5]).any())

    def test_errors_are_one_line_and_leave_output_untouched(self):
        q, k, v = self.random_inputs()
        good = {n: self.save(n + ".npy", x) for n, x in (("q", q), ("k", k), ("v", v))}
        bad_dim = self.save("k_dim.npy", k[..., :20])
        short_v = self.save("v_short.npy", v[:, :5])
        three_kv = self.save("k3.npy", np.zeros((2, 13, 3, 24), np.float32))
        rank3 = self.save("rank3.npy", q[0])
        ints = self.save("ints.npy", np.zeros((2, 9, 4, 24), np.int32))
        slopes = self.save("slopes.npy", np.ones(3, np.float32))
        garbage = self.path("garbage.npy")
        with open(garbage, "wb") as f:
            f.write(b"\x93NUMPY\x01\x00\x10\x00{'descr': 'xx'" + b"\n" * 3)
        out = self.path("out.npy")
        with open(out, "wb") as f:
            f.write(b"previous contents")
        base = ["attend", "--q", good["q"], "--k", good["k"], "--v", good["v"], "--out", out]

        def with_(**changes):
            args = list(base)
            for flag, value in changes.items():
                flag = "--" + flag.replace("_", "-")
                if flag in args:
                    args[args.index(flag) + 1] = value
                else:
                    args += [flag, value]
            return args

        cases = [
            (with_(k=bad_dim), "head_dim"),
            (with_(v=short_v), "v"),
            (with_(k=three_kv, v=three_kv), "kv_heads"),
            (with_(q=rank3), "4"),
            (with_(q=ints), "dtype"),
            (with_(q=garbage), "garbage.npy"),
            (with_(q=self.path("missing.npy")), "missing.npy"),
            (with_(alibi=slopes), "--alibi"),
            (with_(window="-1"), "--window"),
            (with_(causal="diagonal"), "--causal"),
            (with_(dtype="int4"), "--dtype"),
            (with_(threads="0"), "--threads"),
            (with_(softcap="-1"), "--softcap"),
            (with_(mode="bogus"), "--mode"),
            (with_(window="3", causal="none"), "window"),
            (with_(out=self.path("no/such/folder/o.npy")), "folder"),
            (["attend", "--q", good["q"]], None),
        ]
        for args, mention in cases:
            with self.subTest(args=args[1:]):
                result = run(*args)
                self.assert_usage_error(result, mention)
                with open(out, "rb") as f:
                    self.assertEqual(f.read(), b"previous contents")
        leftovers = [n for n in os.listdir(self.tmp) if ".tmp" in n]
        self.assertEqual(leftovers, [])

    def test_number_errors_read_well(self):
        """Bounds in a few readable digits, never DBL_MAX's 309; a value float32
        cannot hold is quoted as typed, not reported as inf or 0."""
        q, k, v = self.random_inputs()
        rank1 = self.save("rank1.npy", np.zeros(5, np.float32))
        cases = [
            (["--softcap", "-1"], "--softcap: expected a number >= 0, got '-1'"),
            (["--scale", "1e39"], "--scale: '1e39' is out of float range"),
            (["--scale", "-1e39"], "--scale: '-1e39' is out of float range"),
            (["--scale", "1e-50"], "--scale: '1e-50' rounds to 0 in float"),
            (["--softcap", "1e400"], "--softcap: '1e400' is out of float range"),
            (["--scale", "abc"], "--scale: expected a number, got 'abc'"),
        ]
        for extra, mention in cases:
            with self.subTest(extra=extra[:2]):
                result, _, _ = self.attend(q, k, v, *extra)
                self.assert_usage_error(result, mention)
                self.assertLess(len(result.stderr), 200, result.stderr)
                self.assertNotIn("inf", result.stderr.replace("--", ""))
        k_path = self.save("k.npy", k)
        result = run("attend", "--q", rank1, "--k", k_path, "--v", k_path,
                     "--out", self.path("o.npy"))
        self.assert_usage_error(result, "shape (5,) has 1 dimension (expected 4")

    def test_headers_are_checked_before_any_data_is_read(self):
        """A q whose header claims 4 GiB next to an input that does not fit it
        fails naming the argument, without reading q's data (before,
        a mismatched k took 59 s and 8.4 GB to be reported)."""
        big_q = sparse_npy(self.path("q_4gib.npy"), (1, 1 << 24, 4, 16))
        narrow_k = self.save("k_dim8.npy", np.zeros((1, 16, 4, 8), np.float32))
        k = self.save("k.npy", np.zeros((1, 16, 4, 16), np.float32))
        slopes = self.save("slopes.npy", np.ones(3, np.float32))
        base = ["attend", "--q", big_q, "--out", self.path("o.npy")]
        cases = [
            (["--k", narrow_k, "--v", k], "k: head_dim 8 (expected 16"),
            (["--k", k, "--v", narrow_k], "v: shape (1, 16, 4, 8)"),
            (["--k", k, "--v", k, "--alibi", slopes], "--alibi"),
            (["--k", k, "--v", k, "--mode", "decode"], "seqlen_q 16777216 > seqlen_k 16"),
        ]
        for extra, mention in cases:
            with self.subTest(extra=extra[-2:]):
                # Judged by memory, not time (timings stay out of pass/fail
                # tests): reading q's data would take 4 GiB; the timeout
                # only stops a hang.
                result, _, peak_bytes = run_measured(*base, *extra, timeout=60)
                self.assert_usage_error(result, mention)
                self.assertLess(peak_bytes, 256 << 20)


if __name__ == "__main__":
    unittest.main()
