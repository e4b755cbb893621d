"""Small random LLaMA-style models in the Hugging Face layout, for the tests of
`lookback generate` (test_generate.py). NumPy only: the weights are written
with this module's own safetensors writer."""

import json
import os
import struct

import numpy as np


def to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (no NaN in the tests)."""
    bits = np.asarray(x, dtype="<f4").view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def encode(array, dtype):
    if dtype == "F32":
        return np.asarray(array, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.asarray(array, dtype="<f2").tobytes()
    if dtype == "BF16":
        return to_bf16_bits(array).tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype="F32", align=8):
    """tensors: {name: array}; every tensor stored as `dtype`."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = encode(array, dtype)
        header[name] = {"dtype": dtype, "shape": list(np.shape(array)),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    """{name: (dtype name, shape, raw bytes)}"""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {name: (e["dtype"], e["shape"], data[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]])
            for name, e in header.items() if name != "__metadata__"}


def write_raw_safetensors(path, tensors):
    """tensors: {name: (dtype name, shape, raw bytes)}, as read_safetensors gives."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(r for _, _, r in tensors.values()))


def make_model(directory, *, hidden=64, heads=4, kv_heads=2, head_dim=None, layers=2,
               intermediate=96, vocab=300, tied=True, dtype="F32", max_positions=128,
               sliding_window=None, seed=0):
    """Writes config.json and model.safetensors with random weights; returns
    the config."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    d = head_dim or hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": max_positions,
        "tie_word_embeddings": tied, "hidden_act": "silu",
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    if sliding_window is not None:
        config["sliding_window"] = sliding_window

    def matrix(out, inp):
        return rng.standard_normal((out, inp)) / np.sqrt(inp)

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm(hidden)
        tensors[p + "self_attn.q_proj.weight"] = matrix(heads * d, hidden) * 2
        tensors[p + "self_attn.k_proj.weight"] = matrix(kv_heads * d, hidden) * 2
        tensors[p + "self_attn.v_proj.weight"] = matrix(kv_heads * d, hidden)
        tensors[p + "self_attn.o_proj.weight"] = matrix(hidden, heads * d) * 3
        tensors[p + "post_attention_layernorm.weight"] = norm(hidden)
        tensors[p + "mlp.gate_proj.weight"] = matrix(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = matrix(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = matrix(hidden, intermediate) * 3
    tensors["model.norm.weight"] = norm(hidden)
    if not tied:
        tensors["lm_head.weight"] = matrix(vocab, hidden) * 4
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors, dtype)
    return config


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire, payload):
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + struct.pack("<f", payload)
    return key + _varint(len(payload)) + payload  # wire 2: length-delimited


def write_sentencepiece(path, words):
    """A SentencePiece unigram tokenizer.model (the protobuf written by hand):
    <unk>, <s>, </s>, then "▁" + each word, each word, and single letters.
    Returns the pieces in id order."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    for w in words:
        pieces.append(("\u2581" + w, -1.0, 1))
    for c in "\u2581abcdefghijklmnopqrstuvwxyz":
        pieces.append((c, -5.0, 1))
    model = b""
    for piece, score, kind in pieces:
        model += _field(1, 2, _field(1, 2, piece.encode()) + _field(2, 5, score) + _field(3, 0, kind))
    model += _field(2, 2, _field(3, 0, 1) + _field(4, 0, len(pieces)))  # unigram
    model += _field(3, 2, _field(1, 2, b"identity"))
    with open(path, "wb") as f:
        f.write(model)
    return [p for p, _, _ in pieces]
