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
