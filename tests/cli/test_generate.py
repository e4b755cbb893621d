"""`lookback generate` against an independent NumPy forward pass
(models/forward.py), on small random models made here: GQA and not, head_dim
16 and 64, tied and untied embeddings, F32/F16/BF16 weights; and every cache
mode and thread count giving the same greedy tokens; and malformed models
refused with one clear line."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clitest  # noqa: E402
import modelgen  # noqa: E402

FORWARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                       "models", "forward.py")
# Logits of lookback (float32) against the float64 oracle, relative to the
# row's largest magnitude, along the whole generation.
RELATIVE_TOLERANCE = 1e-4
GENERATED = 20

MODELS = {
    "gqa_d16_tied_f32": dict(hidden=64, heads=4, kv_heads=2, tied=True, dtype="F32"),
    "mha_d64_untied_bf16": dict(hidden=128, heads=2, kv_heads=2, tied=False, dtype="BF16"),
    "mqa_d64_untied_f16": dict(hidden=96, heads=4, kv_heads=1, head_dim=64, tied=False,
                               dtype="F16"),
    "gqa_d16_window_f32": dict(hidden=64, heads=4, kv_heads=2, tied=True, dtype="F32",
                               sliding_window=9),
}


def oracle_logits(model, tokens, *extra):
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "t.npy"), np.asarray(tokens, dtype="<i4"))
        subprocess.run([sys.executable, FORWARD, model, os.path.join(tmp, "t.npy"),
                        os.path.join(tmp, "l.npy"), *map(str, extra)], check=True,
                       timeout=clitest.TIMEOUT_S)
        return np.load(os.path.join(tmp, "l.npy"))


class GenerateTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.models = {}
        for seed, (name, spec) in enumerate(MODELS.items()):
            path = os.path.join(cls.tmp.name, name)
            modelgen.make_model(path, seed=seed, **spec)
            cls.models[name] = path

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def generate(self, model, prompt_ids, *extra, dump=None):
        args = ["generate", "--model", model, "--prompt-ids", ",".join(map(str, prompt_ids)),
                "--tokens", GENERATED, "--temperature", 0, "--format", "json", *extra]
        if dump:
            args += ["--dump-logits", dump]
        result = clitest.run(*args)
        self.assertEqual(result.returncode, clitest.EXIT_OK, result.stderr)
        return json.loads(result.stdout)

    def test_logits_match_numpy_forward(self):
        rng = np.random.default_rng(7)
        for name, model in self.models.items():
            for prompt_len in (1, 37):
                prompt = rng.integers(0, 300, prompt_len).tolist()
                with self.subTest(model=name, prompt=prompt_len), \
                        tempfile.TemporaryDirectory() as tmp:
                    dump = os.path.join(tmp, "logits.npy")
                    out = self.generate(model, prompt, dump=dump)
                    tokens = out["tokens"]
                    self.assertEqual(len(tokens), GENERATED)
                    logits = np.load(dump)
                    self.assertEqual(logits.shape, (GENERATED, 300))
                    self.assertEqual(logits.dtype, np.dtype("<f4"))
                    self.assertTrue(np.isfinite(logits).all())
                    # Row t follows prompt + the first t generated tokens.
                    sequence = prompt + tokens[:-1]
                    expected = oracle_logits(model, sequence)[prompt_len - 1:]
                    error = np.abs(logits - expected).max(axis=1) / np.abs(expected).max(axis=1)
                    self.assertLessEqual(error.max(), RELATIVE_TOLERANCE,
                                         f"worst row {error.argmax()}")
                    # Greedy: each token is its row's argmax.
                    self.assertEqual(tokens, logits.argmax(axis=1).tolist())

    def test_cache_modes_and_threads_agree(self):
        prompt = list(range(40, 77))
        for name in ("gqa_d16_tied_f32", "mqa_d64_untied_f16", "gqa_d16_window_f32"):
            model = self.models[name]
            reference = self.generate(model, prompt, "--cache", "paged", "--threads", 1)["tokens"]
            for cache in ("paged", "contiguous", "none"):
                for threads in (1, 2, 3):
                    for chunk in (512, 5):
                        with self.subTest(model=name, cache=cache, threads=threads, chunk=chunk):
                            got = self.generate(model, prompt, "--cache", cache, "--threads",
                                                threads, "--prefill-chunk", chunk)["tokens"]
                            self.assertEqual(got, reference)

    def test_streaming_window_and_sinks_on_every_cache(self):
        # StreamingLLM: each token sees the first 3 tokens and the last 7; the
        # ring keeps only those (3 + 6 + a step's tokens per layer), and every
        # cache must give the oracle's logits, the ring bit for bit those of
        # the contiguous cache.
        model = self.models["gqa_d16_window_f32"]  # config window 9: --window 6 narrows it
        prompt = list(range(50, 87))
        streaming = ("--window", 6, "--sink-tokens", 3)
        with tempfile.TemporaryDirectory() as tmp:
            dumps = {}
            # A ring takes --prefill-chunk tokens a step: 3 + 6 + 4 slots wrap many times.
            for cache, chunk in (("contiguous", 4), ("ring", 4), ("ring", 512), ("paged", 5),
                                 ("none", 512)):
                with self.subTest(cache=cache, chunk=chunk):
                    dump = os.path.join(tmp, f"{cache}{chunk}.npy")
                    out = self.generate(model, prompt, "--cache", cache, "--prefill-chunk",
                                        chunk, *streaming, dump=dump)
                    self.assertEqual(out["sink_tokens"], 3)
                    logits = dumps[(cache, chunk)] = np.load(dump)
                    self.assertTrue(np.isfinite(logits).all())
                    expected = oracle_logits(model, prompt + out["tokens"][:-1], "--window", 6,
                                             "--sink-tokens", 3)[len(prompt) - 1:]
                    error = np.abs(logits - expected).max(axis=1) / np.abs(expected).max(axis=1)
                    self.assertLessEqual(error.max(), RELATIVE_TOLERANCE)
            self.assertTrue(np.array_equal(dumps[("ring", 4)], dumps[("contiguous", 4)]))
            # The sinks matter: without them the logits move.
            plain = os.path.join(tmp, "plain.npy")
            self.generate(model, prompt, "--window", 6, dump=plain)
            self.assertGreater(np.abs(np.load(plain)[0] - dumps[("ring", 4)][0]).max(), 1e-3)

    def test_ring_generates_past_max_position_embeddings(self):
        model = self.models["gqa_d16_tied_f32"]  # 128 positions
        args = ["generate", "--model", model, "--prompt-ids", "5,6,7", "--tokens", 200,
                "--temperature", 0, "--format", "json", "--cache", "ring", "--window", 16,
                "--sink-tokens", 2, "--prefill-chunk", 2]  # rings of 2 + 16 + 2 slots
        with tempfile.TemporaryDirectory() as tmp:
            dump = os.path.join(tmp, "l.npy")
            result = clitest.run(*args, "--dump-logits", dump)
            self.assertEqual(result.returncode, clitest.EXIT_OK, result.stderr)
            self.assertIn("pass max_position_embeddings 128", result.stderr)
            tokens = json.loads(result.stdout)["tokens"]
            self.assertEqual(len(tokens), 200)
            logits = np.load(dump)
            self.assertTrue(np.isfinite(logits).all())
            # Absolute positions all the way: the oracle agrees at the end too.
            expected = oracle_logits(model, [5, 6, 7] + tokens[:-1], "--window", 16,
                                     "--sink-tokens", 2)[2:]
            error = np.abs(logits - expected).max(axis=1) / np.abs(expected).max(axis=1)
            self.assertLessEqual(error.max(), RELATIVE_TOLERANCE)
        for extra, phrase in ((["--cache", "ring"], "cache ring: without a window"),
                              (["--sink-tokens", "2"], "sink tokens: 2 without a window")):
            result = clitest.run("generate", "--model", model, "--prompt-ids", "5", *extra)
            self.assertEqual(result.returncode, clitest.EXIT_USAGE, result.stderr)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
            self.assertIn(phrase, result.stderr)

    def test_kv_dtypes_stay_close(self):
        model = self.models["gqa_d16_tied_f32"]
        with tempfile.TemporaryDirectory() as tmp:
            base = os.path.join(tmp, "f32.npy")
            tokens = self.generate(model, [1, 2, 3], dump=base)["tokens"]
            for dtype in ("bf16", "f16"):
                # Teacher-forced: the same tokens through a cache of another dtype.
                dump = os.path.join(tmp, dtype + ".npy")
                self.generate(model, [1, 2, 3], "--kv-dtype", dtype, dump=dump)
                a, b = np.load(base), np.load(dump)
                self.assertTrue(np.isfinite(b).all())
                self.assertLess(np.abs(a[0] - b[0]).max() / np.abs(a[0]).max(), 5e-2)
            self.assertEqual(len(tokens), GENERATED)

    def test_sampling_is_reproducible(self):
        model = self.models["gqa_d16_tied_f32"]
        args = ["generate", "--model", model, "--prompt-ids", "5,6,7", "--tokens", 30,
                "--temperature", 1.0, "--top-k", 50, "--top-p", 0.9, "--format", "json"]
        one = json.loads(clitest.run(*args, "--seed", 3, "--threads", 1).stdout)["tokens"]
        two = json.loads(clitest.run(*args, "--seed", 3, "--threads", 2).stdout)["tokens"]
        other = json.loads(clitest.run(*args, "--seed", 4).stdout)["tokens"]
        self.assertEqual(one, two)
        self.assertNotEqual(one, other)

    def test_text_prompt_is_bytes(self):
        model = self.models["gqa_d16_tied_f32"]
        out = json.loads(clitest.run("generate", "--model", model, "--prompt", "Ab",
                                     "--tokens", 2, "--format", "json").stdout)
        self.assertEqual(out["prompt_tokens"], [65, 98])
        self.assertEqual(out["tokenizer"], "bytes")

    def test_sentencepiece_tokenizer(self):
        with tempfile.TemporaryDirectory() as tmp:
            modelgen.make_model(tmp, vocab=33, seed=5)
            pieces = modelgen.write_sentencepiece(os.path.join(tmp, "tokenizer.model"),
                                                  ["the", "cat", "sat"])
            self.assertEqual(len(pieces), 33)
            result = clitest.run("generate", "--model", tmp, "--prompt", "the cat sat",
                                 "--tokens", 12, "--temperature", 0, "--format", "json")
            self.assertEqual(result.returncode, clitest.EXIT_OK, result.stderr)
            out = json.loads(result.stdout)
            self.assertEqual(out["tokenizer"], "sentencepiece")
            self.assertEqual(out["prompt_tokens"], [1, 3, 4, 5])  # <s> ▁the ▁cat ▁sat
            if all(t > 2 for t in out["tokens"]):  # no control or unknown pieces
                expected = "".join(pieces[t] for t in out["tokens"]).replace("\u2581", " ")
                self.assertEqual(out["text"], expected)

    def test_sharded_weights_give_the_same_logits(self):
        model = self.models["mha_d64_untied_bf16"]
        with tempfile.TemporaryDirectory() as tmp:
            single = os.path.join(tmp, "single.npy")
            self.generate(model, [3, 1, 4], dump=single)
            sharded = os.path.join(tmp, "sharded")
            os.makedirs(sharded)
            shutil.copy(os.path.join(model, "config.json"), sharded)
            tensors = modelgen.read_safetensors(os.path.join(model, "model.safetensors"))
            names = sorted(tensors)
            weight_map = {}
            for part, chunk in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
                file = f"model-0000{part + 1}-of-00002.safetensors"
                modelgen.write_raw_safetensors(os.path.join(sharded, file),
                                               {n: tensors[n] for n in chunk})
                weight_map.update({n: file for n in chunk})
            with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
            dump = os.path.join(tmp, "sharded.npy")
            self.generate(sharded, [3, 1, 4], dump=dump)
            np.testing.assert_array_equal(np.load(single), np.load(dump))


class GenerateErrorTest(unittest.TestCase):
    """Each malformed model or argument: exit 2, one line naming the problem."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.model = os.path.join(self.tmp.name, "m")
        modelgen.make_model(self.model, max_positions=16)
        self.st = os.path.join(self.model, "model.safetensors")
        with open(self.st, "rb") as f:
            self.bytes = f.read()
        (n,) = struct.unpack("<Q", self.bytes[:8])
        self.header = json.loads(self.bytes[8:8 + n])
        self.data = self.bytes[8 + n:]

    def tearDown(self):
        self.tmp.cleanup()

    def rewrite(self, header=None, data=None, raw=None):
        if raw is None:
            text = json.dumps(header if header is not None else self.header).encode()
            raw = struct.pack("<Q", len(text)) + text + (self.data if data is None else data)
        with open(self.st, "wb") as f:
            f.write(raw)

    def expect_error(self, *phrases, prompt="1,2"):
        result = clitest.run("generate", "--model", self.model, "--prompt-ids", prompt,
                             "--tokens", 2)
        self.assertEqual(result.returncode, clitest.EXIT_USAGE, result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        for phrase in phrases:
            self.assertIn(phrase, result.stderr)

    def test_truncated_file(self):
        self.rewrite(raw=self.bytes[:len(self.bytes) // 2])
        self.expect_error("past the end of the data")

    def test_short_file(self):
        self.rewrite(raw=b"\x01\x02")
        self.expect_error("expected at least 8")

    def test_header_length_past_the_file(self):
        self.rewrite(raw=struct.pack("<Q", 10**6) + self.bytes[8:100])
        self.expect_error("header length 1000000 runs past the end")

    def test_header_not_json(self):
        text = b"{not json}"
        self.rewrite(raw=struct.pack("<Q", len(text)) + text)
        self.expect_error("not valid JSON")

    def test_overlapping_offsets(self):
        names = [n for n in self.header if n != "__metadata__"]
        a, b = sorted(names, key=lambda n: self.header[n]["data_offsets"][0])[:2]
        self.header[b]["data_offsets"] = [self.header[a]["data_offsets"][0] + 4,
                                          self.header[a]["data_offsets"][0] + 4 +
                                          self.header[b]["data_offsets"][1] -
                                          self.header[b]["data_offsets"][0]]
        self.rewrite(self.header)
        self.expect_error("overlap")

    def test_offsets_out_of_range(self):
        entry = self.header["model.norm.weight"]
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [len(self.data), len(self.data) + size]
        self.rewrite(self.header)
        self.expect_error("model.norm.weight", "past the end of the data")

    def test_wrong_dtype_name(self):
        self.header["model.norm.weight"]["dtype"] = "F33"
        self.rewrite(self.header)
        self.expect_error("dtype 'F33'")

    def test_unsupported_dtype(self):
        self.header["model.norm.weight"]["dtype"] = "I32"
        self.rewrite(self.header)
        self.expect_error("model.norm.weight", "dtype I32 (expected F32, F16 or BF16)")

    def test_shape_not_matching_config(self):
        with open(os.path.join(self.model, "config.json")) as f:
            config = json.load(f)
        config["intermediate_size"] = 100
        with open(os.path.join(self.model, "config.json"), "w") as f:
            json.dump(config, f)
        self.expect_error("mlp.gate_proj.weight", "expected [100, 64] from config.json")

    def test_byte_count_not_matching_shape(self):
        self.header["model.norm.weight"]["shape"] = [65]
        self.rewrite(self.header)
        self.expect_error("model.norm.weight", "expected 260")

    def test_missing_tensor(self):
        del self.header["model.layers.1.mlp.up_proj.weight"]
        self.rewrite(self.header)
        self.expect_error("model.layers.1.mlp.up_proj.weight", "missing")

    def test_missing_config_key(self):
        with open(os.path.join(self.model, "config.json")) as f:
            config = json.load(f)
        del config["rms_norm_eps"]
        with open(os.path.join(self.model, "config.json"), "w") as f:
            json.dump(config, f)
        self.expect_error("rms_norm_eps missing")

    def test_inconsistent_heads(self):
        with open(os.path.join(self.model, "config.json")) as f:
            config = json.load(f)
        config["num_key_value_heads"] = 3
        with open(os.path.join(self.model, "config.json"), "w") as f:
            json.dump(config, f)
        self.expect_error("not a multiple of num_key_value_heads 3")

    def test_prompt_longer_than_positions(self):
        self.expect_error("max_position_embeddings 16", prompt=",".join(["1"] * 17))

    def test_tokens_past_positions(self):
        ok = clitest.run("generate", "--model", self.model, "--prompt-ids", "1,2", "--tokens", 15,
                         "--format", "json")
        self.assertEqual(ok.returncode, clitest.EXIT_OK, ok.stderr)
        for tokens in (16, 2**62):
            result = clitest.run("generate", "--model", self.model, "--prompt-ids", "1,2",
                                 "--tokens", tokens)
            self.assertEqual(result.returncode, clitest.EXIT_USAGE, result.stderr)
            self.assertIn("expected at most 15", result.stderr)

    def test_token_outside_vocab(self):
        self.expect_error("expected ids below vocab_size 300", prompt="1,300")


class ModelLeakcheckTest(unittest.TestCase):
    """`leakcheck --exec-model` finds the off-by-one mask of a model run by
    models/forward.py, and passes the causal one; `--model` checks lookback's
    own runner, which is causal whatever mask a model was trained with."""

    LEN = 9

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.clean = os.path.join(cls.tmp.name, "clean")
        cls.leaky = os.path.join(cls.tmp.name, "leaky")
        spec = dict(hidden=32, heads=2, kv_heads=1, layers=2, intermediate=48, vocab=64)
        modelgen.make_model(cls.clean, **spec)
        modelgen.make_model(cls.leaky, **spec)
        with open(os.path.join(cls.leaky, "config.json")) as f:
            config = json.load(f)
        config["attention_lookahead"] = 1
        with open(os.path.join(cls.leaky, "config.json"), "w") as f:
            json.dump(config, f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def check(self, *args):
        result = clitest.run("leakcheck", *args, "--format", "json", "--jobs", 2)
        self.assertIn(result.returncode, (clitest.EXIT_OK, clitest.EXIT_FAILURE), result.stderr)
        return result.returncode, json.loads(result.stdout)

    def exec_model(self, model):
        return self.check("--exec-model", f"{sys.executable} {FORWARD} {model} {{tokens}} {{logits}}",
                          "--len", self.LEN, "--vocab", 64, "--batch", 2)

    def test_exec_model_finds_the_off_by_one_mask(self):
        code, report = self.exec_model(self.leaky)
        self.assertEqual(code, clitest.EXIT_FAILURE)
        self.assertEqual(report["verdict"], "leak")
        # Each layer lets row i read one position further: row i reads row
        # i + 1 of the layer below, which already read i + 2. With 2 layers
        # the leaks are exactly (i, i + 1) and (i, i + 2).
        leaks = sorted(tuple(pair) for pair in report["leaks"])
        expected = [(i, j) for i in range(self.LEN) for j in (i + 1, i + 2) if j < self.LEN]
        self.assertEqual(leaks, expected)

    def test_exec_model_passes_the_causal_model(self):
        code, report = self.exec_model(self.clean)
        self.assertEqual(code, clitest.EXIT_OK)
        self.assertEqual(report["verdict"], "causal")
        self.assertEqual(report["missing"], [])

    def test_lookback_runner_is_causal(self):
        for cache in ("paged", "contiguous", "none"):
            for model in (self.clean, self.leaky):
                with self.subTest(cache=cache, model=model):
                    code, report = self.check("--model", model, "--len", self.LEN,
                                              "--cache", cache)
                    self.assertEqual(code, clitest.EXIT_OK)
                    self.assertEqual(report["verdict"], "causal")
                    self.assertEqual(report["missing"], [])

    def test_exec_model_needs_its_fields(self):
        result = clitest.run("leakcheck", "--exec-model", "true {tokens}", "--len", 4,
                             "--vocab", 8)
        self.assertEqual(result.returncode, clitest.EXIT_USAGE)
        self.assertIn("lacks {logits}", result.stderr)
        result = clitest.run("leakcheck", "--exec-model", "x {tokens} {logits}", "--len", 4)
        self.assertEqual(result.returncode, clitest.EXIT_USAGE)
        self.assertIn("--vocab: required", result.stderr)


if __name__ == "__main__":
    unittest.main()
