"""The attention the leak-check test programs share: plain NumPy, one query
row at a time, with the rule of which keys a row reads passed in. Each
program in this folder is one such rule, right or wrong, as a user's
implementation would be; `lookback leakcheck --exec` must tell them apart.

Usage of every program: PROGRAM Q K V OUT (paths of .npy files, layout
(batch, seqlen, heads, head_dim) for Q and O, (batch, seqlen, kv_heads,
head_dim) for K and V).
"""

import os
import sys

# One thread: the same inputs then give the same bits in every run.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def attend(q, k, v, reads, dtype=np.float64):
    """O[b, i, h] = softmax over the keys j with reads(b, h, i, j) of
    q[b, i, h] . k[b, j, kv] / sqrt(D), times v[b, j, kv]."""
    batch, seqlen, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape, dtype=dtype)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for i in range(seqlen):
                keys = [j for j in range(seqlen) if reads(b, h, i, j)]
                if not keys:
                    continue
                scores = k[b, keys, kv].astype(dtype) @ q[b, i, h].astype(dtype) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, i, h] = weights @ v[b, keys, kv].astype(dtype) / weights.sum()
    return out


def main(reads, dtype=np.float64):
    """Reads Q, K, V from argv[1:4], writes O to argv[4]."""
    q_path, k_path, v_path, out_path = sys.argv[1:5]
    q, k, v = np.load(q_path), np.load(k_path), np.load(v_path)
    np.save(out_path, attend(q, k, v, reads, dtype))
