#!/usr/bin/python3
"""The forward pass of a LLaMA-style model in NumPy: the independent oracle for
`lookback generate` and a model command for `lookback leakcheck --exec-model`.

    /usr/bin/python3 models/forward.py MODEL_DIR TOKENS.npy LOGITS.npy [--window W] [--sink-tokens S]

TOKENS.npy holds token ids, <i4 or <i8, shape (batch, n) or (n,); LOGITS.npy
receives <f4 logits of every position, (batch, n, vocab) (or (n, vocab)).

It reads the Hugging Face layout on its own (config.json, model.safetensors
with F32/F16/BF16 tensors; a sharded index too) and shares no code with
lookback: the arithmetic is float64, the attention a plain masked softmax.
The mask is causal unless config.json says "attention_lookahead": L, the
mask a model was trained with when position i could see i + L (the leaky
model of docs/leakage.md); this script runs such a model as it was trained,
leak included, which is what `lookback leakcheck --exec-model` is there to
find. --window W narrows attention to keys i-W..i (with the config's
sliding_window, the narrower counts) and --sink-tokens S keeps keys 0..S-1
visible beside it (StreamingLLM), as `lookback generate` takes them.
"""

import json
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = data[base + begin:base + end]
        shape = tuple(entry["shape"])
        dtype = entry["dtype"]
        if dtype == "F32":
            array = np.frombuffer(raw, dtype="<f4")
        elif dtype == "F16":
            array = np.frombuffer(raw, dtype="<f2")
        elif dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {dtype} (expected F32, F16 or BF16)")
        tensors[name] = array.astype(np.float64).reshape(shape)
    return tensors


def load(directory):
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        tensors = read_safetensors(single)
    else:
        with open(os.path.join(directory, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(read_safetensors(os.path.join(directory, name)))
    return config, tensors


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate(x, theta):
    """Rotate-half RoPE over x (n, heads, d), positions 0 .. n-1."""
    n, _, d = x.shape
    half = d // 2
    inv_freq = theta ** (-2.0 * np.arange(half) / d)
    angle = np.arange(n)[:, None] * inv_freq[None, :]  # (n, half)
    cos = np.cos(angle)[:, None, :]
    sin = np.sin(angle)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate((a * cos - b * sin, a * sin + b * cos), axis=-1)


def forward(config, tensors, tokens, window_left=None, sink_tokens=0):
    """Logits (n, vocab) for one sequence of token ids."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    d = config.get("head_dim") or hidden // heads
    eps = config["rms_norm_eps"]
    theta = config.get("rope_theta", 10000.0)
    lookahead = config.get("attention_lookahead", 0)
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False:
        window = None
    n = len(tokens)

    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    visible = j <= i + lookahead
    if window is not None:
        visible &= j > i - window  # `window` keys, itself included
    if window_left is not None:
        visible &= j >= i - window_left
    if sink_tokens:
        visible |= (j < sink_tokens) & (j <= i + lookahead)

    x = tensors["model.embed_tokens.weight"][np.asarray(tokens)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms_norm(x, tensors[p + "input_layernorm.weight"], eps)
        q = (y @ tensors[p + "self_attn.q_proj.weight"].T).reshape(n, heads, d)
        k = (y @ tensors[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, d)
        v = (y @ tensors[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, d)
        q, k = rotate(q, theta), rotate(k, theta)
        out = np.empty((n, heads, d))
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = (q[:, h] @ k[:, g].T) / np.sqrt(d)
            scores = np.where(visible, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            out[:, h] = weights @ v[:, g]
        x = x + out.reshape(n, heads * d) @ tensors[p + "self_attn.o_proj.weight"].T
        y = rms_norm(x, tensors[p + "post_attention_layernorm.weight"], eps)
        gate = y @ tensors[p + "mlp.gate_proj.weight"].T
        up = y @ tensors[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ tensors[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, tensors["model.norm.weight"], eps)
    head = tensors["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else tensors["lm_head.weight"]
    return x @ head.T


def main():
    args = sys.argv[1:]
    options = {"--window": None, "--sink-tokens": 0}
    while len(args) > 3 and args[-2] in options:
        try:
            options[args[-2]] = int(args[-1])
        except ValueError:
            sys.exit(f"forward.py: {args[-2]} {args[-1]!r} (expected an integer)")
        args = args[:-2]
    if len(args) != 3:
        sys.exit("usage: forward.py MODEL_DIR TOKENS.npy LOGITS.npy [--window W] [--sink-tokens S]")
    sys.argv[1:] = args
    config, tensors = load(sys.argv[1])
    tokens = np.load(sys.argv[2])
    if tokens.dtype.kind not in "iu":
        sys.exit(f"forward.py: {sys.argv[2]}: dtype {tokens.dtype} (expected integer token ids)")
    batched = tokens.ndim == 2
    if not batched:
        tokens = tokens[None]
    if tokens.ndim != 2:
        sys.exit(f"forward.py: {sys.argv[2]}: shape {tokens.shape} (expected (batch, n) or (n,))")
    vocab = config["vocab_size"]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        sys.exit(f"forward.py: token ids outside 0 .. {vocab - 1}")
    logits = np.stack([forward(config, tensors, row, options["--window"], options["--sink-tokens"])
                       for row in tokens]).astype("<f4")
    np.save(sys.argv[3], logits if batched else logits[0])


if __name__ == "__main__":
    main()
