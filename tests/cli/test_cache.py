"""`lookback cache save` and `lookback cache inspect`: a checkpoint made from
.npy files shows its header and verifies; a flipped byte or a truncated file
is reported as damage (exit 1, one line on stderr); an unreadable path or bad
arguments are usage errors (exit 2). The format: docs/checkpoint.md."""

import json
import os
import struct
import unittest

import numpy as np

from clitest import EXIT_FAILURE, CliTestCase, run

# docs/checkpoint.md: the directory's section entries start at byte 24, 32
# bytes each: tag, crc32, offset, length, reserved.
ENTRY_AT = 24
ENTRY_BYTES = 32


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def sections(data):
    """{tag: (offset, length)} read from a checkpoint's directory."""
    count = struct.unpack_from("<I", data, 16)[0]
    found = {}
    for i in range(count):
        tag, _crc, offset, length, _ = struct.unpack_from("<4sIQQQ", data, ENTRY_AT + ENTRY_BYTES * i)
        found[tag.decode()] = (offset, length)
    return found


class CacheTest(CliTestCase):
    def save_kv(self, tokens=40, kv_heads=2, head_dim=24):
        rng = np.random.default_rng(3)
        k = self.path("k.npy")
        v = self.path("v.npy")
        np.save(k, rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float32))
        np.save(v, rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float32))
        return k, v

    def make_checkpoint(self, *extra):
        k, v = self.save_kv()
        out = self.path("prompt.lbkv")
        result = run("cache", "save", "--k", k, "--v", v, "--out", out, *extra)
        self.assert_ok(result)
        return out

    def assert_damaged(self, result, mentions):
        """Exit 1 and exactly one line on stderr naming the damage."""
        self.assertEqual(result.returncode, EXIT_FAILURE,
                         f"exit {result.returncode}, stderr: {result.stderr!r}")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, f"stderr should be one line: {result.stderr!r}")
        self.assertIn("damaged", lines[0])
        self.assertIn(mentions, lines[0])

    def test_save_and_inspect_contiguous(self):
        out = self.make_checkpoint("--dtype", "bf16", "--capacity", "64", "--rope-theta", "10000")
        result = run("cache", "inspect", out)
        self.assert_ok(result)
        for line in ("format: version 1, contiguous", "kv_heads: 2", "head_dim: 24",
                     "storage: bf16", "rope: theta 10000, half rotation (NeoX)",
                     "capacity: 64 tokens", "length: 40 tokens", "status: intact"):
            self.assertIn(line, result.stdout)
        for name in ("header", "keys", "values"):
            self.assertRegex(result.stdout, rf"\n  {name} .* ok\n")
        # Only the 40 filled tokens are stored: bf16, unpadded.
        data = read_bytes(out)
        self.assertEqual(sections(data)["KDAT"][1], 40 * 2 * 24 * 2)

    def test_8bit_checkpoint_holds_codes_and_scales(self):
        for dtype in ("int8", "fp8e4m3", "fp8e5m2"):
            with self.subTest(dtype=dtype):
                out = self.make_checkpoint("--dtype", dtype, "--capacity", "64")
                result = run("cache", "inspect", out)
                self.assert_ok(result)
                self.assertIn("storage: " + dtype, result.stdout)
                self.assertIn("status: intact", result.stdout)
                # 40 tokens x 2 kv heads, each row 24 codes and its f32 scale.
                data = read_bytes(out)
                self.assertEqual(sections(data)["KDAT"][1], 40 * 2 * (24 + 4))

    def test_save_and_inspect_paged_as_json(self):
        out = self.make_checkpoint("--paged", "--block-size", "16", "--num-blocks", "5")
        result = run("cache", "inspect", out, "--format", "json")
        self.assert_ok(result)
        doc = json.loads(result.stdout)
        self.assertEqual(doc["kind"], "paged")
        self.assertEqual(doc["version"], 1)
        self.assertEqual((doc["block_size"], doc["num_blocks"], doc["used_blocks"]), (16, 5, 3))
        self.assertEqual(doc["sequences"], [{"id": 0, "length": 40, "blocks": [0, 1, 2]}])
        self.assertEqual([s["name"] for s in doc["sections"]], ["header", "tables", "keys", "values"])
        self.assertTrue(all(s["crc_ok"] for s in doc["sections"]))
        self.assertTrue(doc["intact"])
        self.assertEqual(doc["problems"], [])

    def test_save_and_inspect_ring(self):
        """A ring of 16 slots, 4 of them for sink tokens, fed 40 tokens: it
        stores tokens 0..3 and 28..39, in position order."""
        out = self.make_checkpoint("--capacity", "16", "--ring-sink-tokens", "4")
        result = run("cache", "inspect", out)
        self.assert_ok(result)
        for line in ("format: version 1, ring", "capacity: 16 tokens", "length: 40 tokens",
                     "sink_tokens: 4", "status: intact"):
            self.assertIn(line, result.stdout)
        doc = json.loads(run("cache", "inspect", out, "--format", "json").stdout)
        self.assertEqual((doc["kind"], doc["capacity"], doc["length"], doc["sink_tokens"]),
                         ("ring", 16, 40, 4))
        data = read_bytes(out)
        self.assertEqual(struct.unpack_from("<I", data, 12)[0], 3)  # kind
        offset, length = sections(data)["KDAT"]
        self.assertEqual(length, 2 * 16 * 24 * 4)
        keys = np.frombuffer(data[offset:offset + length], dtype="<f4").reshape(2, 16, 24)
        k = np.load(self.path("k.npy"))
        positions = list(range(4)) + list(range(28, 40))
        np.testing.assert_array_equal(keys, k[positions].transpose(1, 0, 2))

    def test_flipped_byte_in_the_data_is_damage(self):
        out = self.make_checkpoint()
        data = bytearray(read_bytes(out))
        offset, length = sections(data)["VDAT"]
        data[offset + length // 2] ^= 0x20
        write_bytes(out, data)
        result = run("cache", "inspect", out)
        self.assert_damaged(result, "values section")
        self.assertIn("checksum mismatch", result.stderr)
        self.assertIn("status: DAMAGED", result.stdout)
        self.assertRegex(result.stdout, r"\n  values .* BAD")
        self.assertRegex(result.stdout, r"\n  keys .* ok\n")

    def test_truncated_file_is_damage(self):
        out = self.make_checkpoint()
        data = read_bytes(out)
        for size in (len(data) - 1, len(data) // 2, 100, 5):
            with self.subTest(size=size):
                write_bytes(out, data[:size])
                self.assert_damaged(run("cache", "inspect", out), "truncated")

    def test_other_files_are_damage(self):
        path = self.path("not-a-checkpoint.npy")
        np.save(path, np.zeros(3, dtype=np.float32))
        self.assert_damaged(run("cache", "inspect", path), "not a lookback KV-cache checkpoint")

    def test_missing_file_and_usage_errors(self):
        missing = self.path("missing.lbkv")
        self.assert_usage_error(run("cache", "inspect", missing), mentions=missing)
        self.assert_usage_error(run("cache", "inspect", self.tmp), mentions="not a regular file")
        self.assert_usage_error(run("cache", "inspect"))
        self.assert_usage_error(run("cache"))
        out = self.make_checkpoint()
        self.assert_usage_error(run("cache", "inspect", out, "--format", "xml"), mentions="--format")
        k, v = self.save_kv()
        self.assert_usage_error(
            run("cache", "save", "--k", k, "--v", v, "--out", self.path("x.lbkv"), "--dtype", "f64"),
            mentions="--dtype")
        self.assert_usage_error(
            run("cache", "save", "--k", k, "--v", v, "--out", self.path("x.lbkv"), "--capacity", "3"),
            mentions="capacity")
        bad = self.path("bad.npy")
        np.save(bad, np.zeros((4, 2), dtype=np.float32))
        self.assert_usage_error(
            run("cache", "save", "--k", bad, "--v", v, "--out", self.path("x.lbkv")), mentions="--k")
        self.assertFalse(os.path.exists(self.path("x.lbkv")))

    def test_options_of_the_other_kind_of_cache_are_refused(self):
        """--block-size and --num-blocks size a paged pool, --capacity a
        contiguous cache; given to the other kind they used to be ignored."""
        k, v = self.save_kv()
        out = self.path("x.lbkv")
        cases = [
            (["--block-size", "4"], "--block-size: given without --paged"),
            (["--num-blocks", "4"], "--num-blocks: given without --paged"),
            (["--paged", "--capacity", "64"], "--capacity: given with --paged"),
            (["--ring-sink-tokens", "2"], "--ring-sink-tokens: given without --capacity"),
            (["--paged", "--ring-sink-tokens", "2"], "--ring-sink-tokens: given with --paged"),
            (["--capacity", "4", "--ring-sink-tokens", "4"],
             "--ring-sink-tokens: 4 (expected less than --capacity 4"),
        ]
        for extra, mention in cases:
            with self.subTest(extra=extra):
                result = run("cache", "save", "--k", k, "--v", v, "--out", out, *extra)
                self.assert_usage_error(result, mention)
                self.assertFalse(os.path.exists(out))

    def test_number_errors_read_well(self):
        k, v = self.save_kv()
        result = run("cache", "save", "--k", k, "--v", v, "--out", self.path("x.lbkv"),
                     "--rope-theta", "1e39")
        self.assert_usage_error(result, "--rope-theta: '1e39' is out of float range")
        flat = self.path("flat.npy")
        np.save(flat, np.zeros(4, dtype=np.float32))
        result = run("cache", "save", "--k", flat, "--v", flat, "--out", self.path("x.lbkv"))
        self.assert_usage_error(result, "1 dimension (expected 3")


if __name__ == "__main__":
    unittest.main()
