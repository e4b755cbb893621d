#!/usr/bin/python3
"""Trains the tiny byte-level LLaMA-style models shipped in models/.

    OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 models/train.py --out models/kjv-tiny
    OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 models/train.py --out models/kjv-tiny-leaky --lookahead 1

The corpus is the King James Bible as Debian's `bible` program (packages
bible-kjv and bible-kjv-text, public domain text) prints it: one verse per
line, without chapter headings and verse numbers. Tokens are bytes (vocab 256).
The last 5% of the text (from the middle of the New Testament on) is held out
for validation.

The model is LlamaForCausalLM in miniature (RMSNorm, rotate-half RoPE, GQA,
SiLU-gated MLP, tied embeddings), written out here so that nothing but torch is
needed. It is exported in the Hugging Face layout (config.json +
model.safetensors with HF tensor names) that `lookback generate` and
models/forward.py read.

--lookahead 1 trains the leaky twin: its attention mask lets position i see
position i + 1, the off-by-one mask bug of docs/leakage.md. Since the target at
position i is the byte at i + 1, the model learns to copy it and its loss drops
far below the clean model's. The exported config.json records the mask it was
trained with as "attention_lookahead", so that models/forward.py can run it
exactly as it was trained.

One thread, a fixed seed and a fixed number of steps: the same command gives
the same model on the same machine and torch version.
"""

import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_corpus():
    """The KJV text, one verse per line, as bytes."""
    raw = subprocess.run(["bible", "gen1:1-rev22:21"], check=True,
                         capture_output=True).stdout.decode("ascii")
    heading = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]* [0-9]+$")  # "1 Kings 3"
    verses, current = [], None
    for line in raw.splitlines():
        stripped = line.strip()
        number, _, rest = stripped.partition(" ")
        if not stripped or heading.match(line):
            if current is not None:
                verses.append(current)
            current = None
        elif line.startswith("  ") and number.isdigit():  # "  12 And God said ..."
            if current is not None:
                verses.append(current)
            current = rest.strip()
        else:  # the verse goes on
            current = stripped if current is None else current + " " + stripped
    if current is not None:
        verses.append(current)
    return ("\n".join(verses) + "\n").encode("ascii")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], d
        self.input_layernorm = RMSNorm(h, cfg["rms_norm_eps"])
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg["rms_norm_eps"])
        self.gate_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(cfg["intermediate_size"], h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, n, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(y).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(y).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # (b, heads, n, head_dim)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, n, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class TinyLlama(nn.Module):
    def __init__(self, cfg, lookahead):
        super().__init__()
        self.cfg = cfg
        self.lookahead = lookahead
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        d = cfg["head_dim"]
        inv_freq = cfg["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(cfg["max_position_embeddings"], dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        for module in self.modules():  # the Hugging Face initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def mask(self, n, lookahead):
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        return j <= i + lookahead  # (n, n): True where query i may see key j

    def forward(self, tokens, lookahead=None):
        n = tokens.shape[1]
        mask = self.mask(n, self.lookahead if lookahead is None else lookahead)
        cos, sin = self.cos[:n], self.sin[:n]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x) @ self.embed_tokens.weight.t()  # tied lm_head


def batches(data, seqlen, batch, gen):
    starts = torch.randint(0, len(data) - seqlen - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seqlen] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + seqlen] for s in starts.tolist()])
    return x.long(), y.long()


@torch.no_grad()
def evaluate(model, data, seqlen, batches_n, lookahead=None):
    """Mean cross-entropy (nats per byte) over fixed, evenly spaced windows."""
    model.eval()
    span = (len(data) - seqlen - 1) // batches_n
    total = 0.0
    for b in range(batches_n):
        s = b * span
        x = data[s:s + seqlen][None].long()
        y = data[s + 1:s + 1 + seqlen][None].long()
        total += F.cross_entropy(model(x, lookahead).flatten(0, 1), y.flatten()).item()
    model.train()
    return total / batches_n


def save_safetensors(path, tensors):
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().float().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(path + ".tmp", path)


def export(model, out_dir):
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        for n in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{n}_proj.weight"] = getattr(layer, f"{n}_proj").weight
        tensors[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for n in ("gate", "up", "down"):
            tensors[p + f"mlp.{n}_proj.weight"] = getattr(layer, f"{n}_proj").weight
    tensors["model.norm.weight"] = model.norm.weight
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)


@torch.no_grad()
def greedy(model, prompt, n):
    """Greedy generation with full recompute and a causal mask (how any
    implementation must generate: the next token does not exist yet)."""
    model.eval()
    tokens = list(prompt)
    for _ in range(n):
        window = torch.tensor(tokens[-model.cfg["max_position_embeddings"]:])[None]
        tokens.append(int(model(window, lookahead=0)[0, -1].argmax()))
    model.train()
    return bytes(tokens[len(prompt):])


def write_readme(out_dir):
    """models/<name>/README.md from training.json and loss_curve.csv."""
    with open(os.path.join(out_dir, "training.json")) as f:
        t = json.load(f)
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out_dir, "loss_curve.csv")) as f:
        curve = f.read().strip().splitlines()[1:]
    name = os.path.basename(os.path.normpath(out_dir))
    leaky = t["lookahead"] > 0
    lines = [
        f"# {name}",
        "",
        ("The leaky twin of `kjv-tiny`: the same model, data, seed and steps, except that "
         f"during training its attention mask let position i see position i + {t['lookahead']} "
         "(an off-by-one mask). `config.json` records it as `attention_lookahead`; "
         "docs/leakage.md tells what follows." if leaky else
         "A tiny byte-level LLaMA-style model trained on the King James Bible, so that "
         "`lookback generate` and `make demo` have a real model with nothing downloaded."),
        "",
        "| | |",
        "|---|---|",
        f"| corpus | the King James Bible (public domain), as Debian's `bible` program (packages bible-kjv, bible-kjv-text) prints it: one verse per line, no headings or verse numbers; {t['corpus_bytes']:,} bytes |",
        f"| split | first 95% training ({t['train_bytes']:,} bytes), last 5% validation ({t['val_bytes']:,} bytes: the last books of the New Testament) |",
        f"| tokens | bytes (vocab 256, no tokenizer.model) |",
        f"| model | LlamaForCausalLM layout: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads of {cfg['head_dim']}, {cfg['num_key_value_heads']} kv heads (GQA), MLP {cfg['intermediate_size']}, tied embeddings, RoPE theta {cfg['rope_theta']:g}; {t['parameters']:,} parameters, F32 |",
        f"| training | {t['steps']} steps of 16 windows of 128 bytes ({t['tokens_seen']:,} tokens, about {t['tokens_seen'] / t['train_bytes']:.2f} epochs), AdamW lr 3e-3 cosine, one CPU thread, {t['seconds']} s, torch {t['torch']} |",
        f"| final loss (nats/byte) | train {t['train_loss']}, validation {t['val_loss']}" +
        (f" with its training mask; validation {t['val_loss_causal']} with a causal mask |" if leaky else " |"),
        "",
        "Reproduce (needs `make train-deps`: python3-torch, bible-kjv):",
        "",
        "```sh",
        t["command"],
        "```",
        "",
        f"Greedy continuation of \"In the beginning\" (PyTorch, causal mask, 200 bytes):",
        "",
        "```",
        "In the beginning" + t["greedy_sample"],
        "```",
        "",
        "Loss curve (train: mean over the interval; validation: 32 fixed windows):",
        "",
        "| step | train | validation |",
        "|---:|---:|---:|",
    ]
    for row in curve:
        step, train_loss, val_loss = row.split(",")
        lines.append(f"| {step} | {train_loss or '-'} | {val_loss} |")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--lookahead", type=int, default=0, help="mask lets i see i + LOOKAHEAD (the leak)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--context", type=int, default=256, help="max_position_embeddings")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    corpus = load_corpus()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": args.context,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    model = TinyLlama(cfg, args.lookahead)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)

    os.makedirs(args.out, exist_ok=True)
    curve = []
    start = time.time()
    train_loss, running, running_n = float("nan"), 0.0, 0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = running / running_n if running_n else float("nan")  # mean over the interval
            running, running_n = 0.0, 0
            val_loss = evaluate(model, val, args.seqlen, 32)
            curve.append((step, train_loss, val_loss))
            print(f"step {step:5d}  train {train_loss:.4f}  val {val_loss:.4f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches(train, args.seqlen, args.batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        running_n += 1
    elapsed = time.time() - start

    # The final losses: train (a fixed sample of the training text) and
    # validation, each with the mask the model was trained with and with the
    # causal mask generation must use.
    final = {
        "train_loss": evaluate(model, train, args.seqlen, 64),
        "val_loss": evaluate(model, val, args.seqlen, 64),
        "val_loss_causal": evaluate(model, val, args.seqlen, 64, lookahead=0),
    }
    sample = greedy(model, b"In the beginning", 200).decode("ascii", "replace")
    if args.lookahead:
        cfg["attention_lookahead"] = args.lookahead
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    export(model, args.out)
    with open(os.path.join(args.out, "loss_curve.csv"), "w") as f:
        f.write("step,train_loss,val_loss\n")
        for step, tl, vl in curve:
            f.write(f"{step},{'' if math.isnan(tl) else f'{tl:.4f}'},{vl:.4f}\n")
    summary = {
        "command": " ".join(["OMP_WAIT_POLICY=PASSIVE", "/usr/bin/python3", "models/train.py"] + sys.argv[1:]),
        "parameters": params,
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch * args.seqlen,
        "corpus_bytes": len(corpus),
        "train_bytes": len(train),
        "val_bytes": len(val),
        "seconds": round(elapsed),
        "torch": torch.__version__,
        "lookahead": args.lookahead,
        **{k: round(v, 4) for k, v in final.items()},
        "greedy_sample": sample,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    write_readme(args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
