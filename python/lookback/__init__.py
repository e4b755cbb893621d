"""lookback: causal attention, KV caches and the leak check, from Python.

Arrays use FlashAttention's layout (DESIGN.md §1, docs/semantics.md):

    q        (batch, seqlen_q, heads,    head_dim)
    k, v     (batch, seqlen_k, kv_heads, head_dim)
    out      (batch, seqlen_q, heads,    head_dim)   float32
    lse      (batch, heads, seqlen_q)                float32, natural log

Inputs are NumPy arrays of float32, float16 or float64 with any strides (read
in place, no copy), or CPU torch.Tensors (read in place through their NumPy
view; bfloat16 ones as their 16-bit words). NumPy in, NumPy out;
torch in, torch out. The GIL is released while the kernels run.

Errors: the library's message as ValueError (shapes, dtypes, options),
TypeError for arguments of the wrong type, OSError for files.
See docs/python.md.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lookback

__version__: str = _lookback.__version__

# A child made by fork() (multiprocessing, DataLoader workers) gets fresh
# contexts: the parent's worker threads do not exist in it.
import os as _os

if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_lookback.forget_contexts_after_fork)

__all__ = [
    "attention",
    "attention_varlen",
    "reference_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "KVCache",
    "PagedKVPool",
    "leakcheck",
    "LeakReport",
    "visible_mask",
    "merge_states",
    "kernel_info",
    "__version__",
]

Causal = Union[str, bool]

# ---- torch tensors ----------------------------------------------------------


def _torch():
    """torch when the caller has imported it (lookback never imports it)."""
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _as_array(x: Any, name: str) -> Any:
    """A CPU torch.Tensor as a NumPy view of its memory; anything else as is."""
    if not _is_tensor(x):
        return x
    torch = _torch()
    if x.device.type != "cpu":
        raise ValueError(f"{name}: a tensor on {x.device} (expected a CPU tensor; move it with .cpu())")
    x = x.detach()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: its 16-bit words, read as bf16
        return _lookback.Bf16Array(x.view(torch.int16).numpy())
    return x.numpy()


def _as_numpy(x: Any, name: str) -> Any:
    """Like _as_array, but always a NumPy array (bfloat16 becomes float32)."""
    if _is_tensor(x) and x.dtype == _torch().bfloat16:
        x = x.detach().float()
    return _as_array(x, name)


def _like(result: Any, torch_out: bool) -> Any:
    if not torch_out:
        return result
    torch = _torch()
    if isinstance(result, tuple):
        return tuple(torch.from_numpy(r) for r in result)
    return torch.from_numpy(result)


# ---- attention --------------------------------------------------------------


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Causal = "bottom-right",
    window: Optional[int] = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    scale: Optional[float] = None,
    dtype: str = "f32",
    sink_tokens: int = 0,
    sink_logits: Any = None,
    return_lse: bool = False,
    threads: Optional[int] = None,
    out: Any = None,
) -> Any:
    """Causal attention of q over k, v (FlashAttention layout).

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads,
    head_dim), heads a multiple of kv_heads (GQA/MQA: query head h reads kv
    head h // (heads // kv_heads)). NumPy arrays (float32, float16, float64,
    any strides: a transposed view of a (B, H, S, D) array is read in place)
    or CPU torch tensors.

    The mask (docs/semantics.md): query row i sits at position
    p(i) = i + seqlen_k - seqlen_q ("bottom-right", the default and True;
    right for new tokens after cached ones) or p(i) = i ("top-left", PyTorch's
    is_causal=True); key j is visible iff j <= p(i), and with window=W also
    j >= p(i) - W (W + 1 keys, the query's own included). "none" (or False)
    makes every key visible. A row with no visible key gives zeros and
    lse = -inf. sink_tokens=S (StreamingLLM, needs window): keys j < S stay
    visible too (j <= p(i) still holds).

    Scores: s = scale * q.k (scale defaults to 1/sqrt(head_dim)); softcap
    c > 0: s = c * tanh(s / c); alibi_slopes (heads,): s -= m_h * |p(i) - j|.
    sink_logits (heads,), finite (gpt-oss's learned sinks): one more term
    e^sink_h in each row's softmax denominator, with no value; a row with no
    visible key then gives zeros and lse = sink_h.

    dtype is what the kernels hold Q, K, V in: "f32", "bf16" or "f16"; or
    "int8", "fp8e4m3", "fp8e5m2", which store K and V in 8 bits with one f32
    scale per (token, kv head) row (Q stays f32); accumulation is float32. threads: None for every core.

    Returns out (batch, seqlen_q, heads, head_dim) float32, or (out, lse)
    with return_lse=True, lse (batch, heads, seqlen_q) in natural log.
    out=: a float32 array (or tensor) of that shape, any strides, to write
    into instead of a new one (it must not overlap q, k or v); it is returned.
    """
    torch_out = _is_tensor(q)
    arrays = [_as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v")]
    out_array = None
    if out is not None:
        if _is_tensor(out) and out.requires_grad:
            raise ValueError("out: a tensor that requires grad (lookback computes no gradients)")
        out_array = _as_array(out, "out")
        for name, array in zip("qkv", arrays):
            if isinstance(out_array, np.ndarray) and isinstance(array, np.ndarray) and \
                    np.may_share_memory(out_array, array):
                raise ValueError(f"out: overlaps {name} (expected an array of its own)")
    result = _lookback.attention(
        *arrays, causal=causal, window=window, softcap=softcap,
        alibi_slopes=_as_numpy(alibi_slopes, "alibi_slopes"), scale=scale, dtype=dtype,
        sink_tokens=sink_tokens, sink_logits=_as_numpy(sink_logits, "sink_logits"),
        return_lse=return_lse, threads=threads, out=out_array, reference=False)
    if out is not None:
        return (out, _like(result[1], torch_out)) if return_lse else out
    return _like(result, torch_out)


def reference_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Causal = "bottom-right",
    window: Optional[int] = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    scale: Optional[float] = None,
    sink_tokens: int = 0,
    sink_logits: Any = None,
    return_lse: bool = False,
) -> Any:
    """The library's float64 oracle (naive loops, no SIMD), same arguments and
    results as attention() (rounded to float32 at the end). For tests: slow."""
    torch_out = _is_tensor(q)
    result = _lookback.attention(
        _as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v"),
        causal=causal, window=window, softcap=softcap,
        alibi_slopes=_as_numpy(alibi_slopes, "alibi_slopes"), scale=scale, dtype="f32",
        sink_tokens=sink_tokens, sink_logits=_as_numpy(sink_logits, "sink_logits"),
        return_lse=return_lse, threads=1, out=None, reference=True)
    return _like(result, torch_out)


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: Causal = "bottom-right",
    window: Optional[int] = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    scale: Optional[float] = None,
    dtype: str = "f32",
    sink_tokens: int = 0,
    sink_logits: Any = None,
    return_lse: bool = False,
    threads: Optional[int] = None,
) -> Any:
    """attention() over a packed batch of sequences of different lengths
    (FlashAttention's varlen layout, docs/semantics.md §10).

    q (total_q, heads, head_dim); k, v (total_k, kv_heads, head_dim): the
    sequences end to end. cu_seqlens_q, cu_seqlens_k (batch + 1,) int32 or
    int64 (arrays, tensors or lists): 0, then the end of each sequence, never
    decreasing, ending at total_q / total_k; sequences may be empty. Sequence b
    is q[cu_q[b]:cu_q[b+1]] against k, v[cu_k[b]:cu_k[b+1]], masked as a
    sequence of its own; every other argument is attention()'s.

    Returns out (total_q, heads, head_dim) float32, or (out, lse) with lse
    (heads, total_q): row for row what attention() gives each sequence alone.
    """
    torch_out = _is_tensor(q)
    result = _lookback.attention_varlen(
        _as_array(q, "q"), _as_array(k, "k"), _as_array(v, "v"),
        _offsets(cu_seqlens_q, "cu_seqlens_q"), _offsets(cu_seqlens_k, "cu_seqlens_k"),
        causal=causal, window=window, softcap=softcap,
        alibi_slopes=_as_numpy(alibi_slopes, "alibi_slopes"), scale=scale, dtype=dtype,
        sink_tokens=sink_tokens, sink_logits=_as_numpy(sink_logits, "sink_logits"),
        return_lse=return_lse, threads=threads)
    return _like(result, torch_out)


def _offsets(x: Any, name: str) -> Any:
    """cu_seqlens as a NumPy array (a list becomes int64; the library checks
    the dtype and the offsets)."""
    x = _as_array(x, name)
    return x if isinstance(x, np.ndarray) else np.asarray(x)


# ---- FlashAttention's interface ---------------------------------------------


def _flash_window(window_size: Any, causal: bool) -> Optional[int]:
    """FlashAttention's window_size=(left, right) as lookback's left window."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"window_size: expected a pair of ints, got {window_size!r}") from None
    if (left, right) == (-1, -1):
        return None
    if not causal:
        raise ValueError(f"window_size: {tuple(window_size)} without causal=True "
                         "(expected (-1, -1): lookback's windows are causal)")
    if right not in (-1, 0) or left < -1:
        raise ValueError(f"window_size: {tuple(window_size)} (expected (left, 0) or "
                         "(left, -1) with left >= -1)")
    return None if left == -1 else left


def _flash_checks(dropout_p: float, alibi_slopes: Any) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: {dropout_p} (expected 0: lookback has no dropout)")
    if alibi_slopes is not None and getattr(alibi_slopes, "ndim", 1) != 1:
        raise ValueError("alibi_slopes: expected shape (heads,): one slope per query head")


def _flash_storage(q: Any) -> Tuple[str, Any]:
    """(storage, input dtype): storage follows the input, as on a GPU."""
    if _is_tensor(q):
        torch = _torch()
        return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(q.dtype, "f32"), q.dtype
    if isinstance(q, np.ndarray):
        return ("f16" if q.dtype == np.float16 else "f32"), q.dtype
    return "f32", None


def _flash_result(out: Any, lse: Any, input_dtype: Any, return_attn_probs: bool) -> Any:
    """out in q's dtype; (out, lse, None) with return_attn_probs."""
    if input_dtype is not None and out.dtype != input_dtype:
        out = out.to(input_dtype) if _is_tensor(out) else out.astype(input_dtype)
    if return_attn_probs:
        return out, lse, None
    return out


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash_attn.flash_attn_func on the CPU: same signature and semantics.

    causal=True is bottom-right aligned, as in FlashAttention 2.1+.
    window_size=(left, right): (-1, -1) is no window; with causal=True a left
    window W >= 0 keeps keys p(i) - W .. p(i), and right must be -1 or 0.
    Other windows and dropout_p > 0 are a ValueError. Storage follows the
    input dtype (float16 -> f16, bfloat16 -> bf16, else f32), as on a GPU,
    and out has q's dtype. return_attn_probs=True returns (out, lse, None):
    the probabilities are never materialised.
    """
    _flash_checks(dropout_p, alibi_slopes)
    window = _flash_window(window_size, causal)
    storage, input_dtype = _flash_storage(q)
    out, lse = attention(q, k, v, causal=bool(causal), window=window, softcap=softcap,
                         alibi_slopes=alibi_slopes, scale=softmax_scale, dtype=storage,
                         return_lse=True)
    return _flash_result(out, lse, input_dtype, return_attn_probs)


def _check_max_seqlen(max_seqlen: Any, cu_seqlens: Any, name: str, cu_name: str) -> None:
    """max_seqlen must be at least the longest sequence in cu_seqlens (an
    upper bound, as FlashAttention takes it); offsets that are malformed are
    left to the library's checks (and its messages)."""
    offsets = np.asarray(_as_numpy(cu_seqlens, cu_name))
    if offsets.ndim != 1 or offsets.size < 2 or offsets.dtype.kind != "i":
        return
    lengths = np.diff(offsets)
    if (lengths < 0).any():
        return
    longest = int(lengths.max())
    if int(max_seqlen) < longest:
        raise ValueError(f"{name}: {max_seqlen} (expected at least {longest}, the longest "
                         f"sequence in {cu_name})")


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash_attn.flash_attn_varlen_func on the CPU: same signature and
    semantics as FlashAttention 2's, over attention_varlen().

    q (total_q, heads, head_dim), k, v (total_k, kv_heads, head_dim) packed;
    cu_seqlens_q, cu_seqlens_k (batch + 1,) int32 offsets. max_seqlen_q and
    max_seqlen_k bound the longest sequence of each (a ValueError when one
    is shorter; they need not be exact). The other arguments are flash_attn_func's; causal=True is
    bottom-right aligned within each sequence. return_attn_probs=True returns
    (out, lse, None) with lse (heads, total_q).
    """
    _flash_checks(dropout_p, alibi_slopes)
    window = _flash_window(window_size, causal)
    _check_max_seqlen(max_seqlen_q, cu_seqlens_q, "max_seqlen_q", "cu_seqlens_q")
    _check_max_seqlen(max_seqlen_k, cu_seqlens_k, "max_seqlen_k", "cu_seqlens_k")
    storage, input_dtype = _flash_storage(q)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=bool(causal),
                                window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                scale=softmax_scale, dtype=storage, return_lse=True)
    return _flash_result(out, lse, input_dtype, return_attn_probs)


# ---- KV caches --------------------------------------------------------------


class KVCache:
    """One sequence's KV cache: contiguous storage for `capacity` tokens.

    Memory is touched only as tokens are appended. dtype is the storage:
    "f32", "bf16", "f16", or 8-bit "int8", "fp8e4m3", "fp8e5m2" (one f32
    scale per token and kv head beside the codes). rope_theta: rotate K at append and Q at attend by
    their absolute positions (NeoX half rotation), so raw projections can be
    handed in.

        c = KVCache(capacity, kv_heads, head_dim)
        c.append(k, v)        # (tokens, kv_heads, head_dim)
        out = c.attend(q)     # (tokens, heads, head_dim): the newest tokens

    ring=True makes it a ring (StreamingLLM, sliding-window models): the
    first ring_sink_tokens tokens stay for ever, the other slots hold the
    newest tokens, each append overwriting the oldest, so a window W with
    those sink tokens decodes without end in ring_sink_tokens + W + chunk
    slots. len() keeps counting every token (positions stay absolute);
    attending with a window, new tokens or sink tokens that reach an
    overwritten token is a ValueError. save() and load() keep a ring a ring.

        c = KVCache(4 + 128 + 1, 8, 128, ring=True, ring_sink_tokens=4)
        c.append(k, v); out = c.attend(q, window=128, sink_tokens=4)
    """

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, dtype: str = "f32",
                 rope_theta: Optional[float] = None, ring: bool = False,
                 ring_sink_tokens: int = 0) -> None:
        if ring_sink_tokens and not ring:
            raise ValueError(f"ring_sink_tokens: {ring_sink_tokens} without ring=True "
                             "(expected ring=True, or ring_sink_tokens=0)")
        self._cache = _lookback.KvCache(capacity, kv_heads, head_dim, dtype=dtype,
                                        rope_theta=rope_theta,
                                        ring_sink_tokens=ring_sink_tokens if ring else None)

    @classmethod
    def load(cls, path: str) -> "KVCache":
        """A cache from a checkpoint written by save() (docs/checkpoint.md);
        a ring's checkpoint loads as a ring (ring_sink_tokens set). A
        missing, damaged or truncated file is an OSError."""
        cache = cls.__new__(cls)
        cache._cache = _lookback.KvCache.load(str(path))
        return cache

    def append(self, k: Any, v: Any) -> None:
        """Appends tokens: k, v (tokens, kv_heads, head_dim), any input dtype.
        Past the capacity it is a ValueError and nothing is appended."""
        self._cache.append(_as_array(k, "k"), _as_array(v, "v"))

    def attend(self, q: Any, *, scale: Optional[float] = None, softcap: float = 0.0,
               window: Optional[int] = None, alibi_slopes: Any = None, sink_tokens: int = 0,
               sink_logits: Any = None, return_lse: bool = False,
               threads: Optional[int] = None) -> Any:
        """Attends q (tokens, heads, head_dim), the `tokens` newest tokens of
        the sequence (appended already), to the cache, bottom-right aligned:
        row t sits at position len(self) - tokens + t. sink_tokens and
        sink_logits as in attention(). Returns out (tokens, heads, head_dim)
        float32, or (out, lse) with lse (heads, tokens)."""
        result = self._cache.attend(_as_array(q, "q"), scale=scale, softcap=softcap,
                                    window=window,
                                    alibi_slopes=_as_numpy(alibi_slopes, "alibi_slopes"),
                                    sink_tokens=sink_tokens,
                                    sink_logits=_as_numpy(sink_logits, "sink_logits"),
                                    return_lse=return_lse, threads=threads)
        return _like(result, _is_tensor(q))

    def __len__(self) -> int:
        """Tokens appended so far."""
        return self._cache.__len__()

    @property
    def capacity(self) -> int:
        """Tokens the cache can hold (a ring's slots)."""
        return self._cache.capacity

    @property
    def ring_sink_tokens(self) -> Optional[int]:
        """A ring's sink tokens, or None for a cache that is not a ring."""
        return self._cache.ring_sink_tokens

    @property
    def first_kept(self) -> int:
        """The oldest token a ring still holds above its sink tokens (0 until
        it wraps, and for a cache that is not a ring)."""
        return self._cache.first_kept

    @property
    def kv_heads(self) -> int:
        """Key/value heads per token."""
        return self._cache.config["kv_heads"]

    @property
    def head_dim(self) -> int:
        """Values per head."""
        return self._cache.config["head_dim"]

    @property
    def dtype(self) -> str:
        """The storage dtype: "f32", "bf16", "f16", "int8", "fp8e4m3" or "fp8e5m2"."""
        return self._cache.config["dtype"]

    def clear(self) -> None:
        """Forgets every token (the capacity stays)."""
        self._cache.clear()

    def save(self, path: str) -> None:
        """Writes a checkpoint (atomically for a regular file); OSError when
        the path cannot be written."""
        self._cache.save(str(path))

    def __repr__(self) -> str:
        return (f"KVCache(len={len(self)}, capacity={self.capacity}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype!r})")


class PagedKVPool:
    """Many sequences in a pool of `num_blocks` blocks of `block_size` tokens,
    with a block table per sequence (vLLM style). fork() shares a sequence's
    blocks without copying; appending to a shared, partly filled block copies
    it first (copy-on-write).

        pool = PagedKVPool(num_blocks, block_size, kv_heads, head_dim)
        s = pool.create(); pool.append(s, k, v); out = pool.attend(s, q)
    """

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: str = "f32", rope_theta: Optional[float] = None) -> None:
        self._pool = _lookback.PagedKvPool(num_blocks, block_size, kv_heads, head_dim,
                                           dtype=dtype, rope_theta=rope_theta)

    @classmethod
    def load(cls, path: str) -> "PagedKVPool":
        """A pool from a checkpoint written by save(), block tables included."""
        pool = cls.__new__(cls)
        pool._pool = _lookback.PagedKvPool.load(str(path))
        return pool

    def create(self) -> int:
        """A new, empty sequence; returns its id."""
        return self._pool.create()

    def fork(self, parent: int) -> int:
        """A new sequence sharing every block of `parent` (no copy)."""
        return self._pool.fork(parent)

    def release(self, sequence: int) -> None:
        """Returns the sequence's blocks to the pool (shared ones when their
        last user lets go)."""
        self._pool.release(sequence)

    def append(self, sequence: int, k: Any, v: Any) -> None:
        """Appends tokens (k, v: (tokens, kv_heads, head_dim)). All or nothing:
        with too few free blocks it is a ValueError and nothing changes."""
        self._pool.append(sequence, _as_array(k, "k"), _as_array(v, "v"))

    def attend(self, sequence: int, q: Any, *, scale: Optional[float] = None,
               softcap: float = 0.0, window: Optional[int] = None, alibi_slopes: Any = None,
               sink_tokens: int = 0, sink_logits: Any = None, return_lse: bool = False,
               threads: Optional[int] = None) -> Any:
        """As KVCache.attend, for one sequence of the pool."""
        result = self._pool.attend(sequence, _as_array(q, "q"), scale=scale, softcap=softcap,
                                   window=window,
                                   alibi_slopes=_as_numpy(alibi_slopes, "alibi_slopes"),
                                   sink_tokens=sink_tokens,
                                   sink_logits=_as_numpy(sink_logits, "sink_logits"),
                                   return_lse=return_lse, threads=threads)
        return _like(result, _is_tensor(q))

    def length(self, sequence: int) -> int:
        """Tokens in the sequence."""
        return self._pool.length(sequence)

    def block_table(self, sequence: int) -> List[int]:
        """The sequence's block ids, in order."""
        return self._pool.block_table(sequence)

    def sequences(self) -> List[int]:
        """The ids of the live sequences."""
        return self._pool.sequences()

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds."""
        return self._pool.free_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self._pool.num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._pool.block_size

    def save(self, path: str) -> None:
        """Writes a checkpoint of the whole pool."""
        self._pool.save(str(path))

    def __repr__(self) -> str:
        return (f"PagedKVPool(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"free_blocks={self.free_blocks}, sequences={len(self.sequences())})")


# ---- diagnostics ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeakReport:
    """What leakcheck() found.

    verdict: "causal" (no leak) or "leak". leaks: (i, j) pairs, sorted, where
    output row i changed with position j although the mask hides j from i.
    missing: visible pairs whose change was never seen (a warning).
    dependency: bool (length, length), row i changed with position j, over
    every batch element and head; per_batch_head: bool (batch, heads, length,
    length). runs: how often fn was called (length + 2).
    """

    verdict: str
    leaks: List[Tuple[int, int]]
    missing: List[Tuple[int, int]]
    dependency: np.ndarray
    per_batch_head: np.ndarray
    runs: int


def leakcheck(fn: Callable[[Any, Any, Any], Any], length: int, heads: int, kv_heads: int,
              dim: int, *, batch: int = 1, causal: Causal = "bottom-right",
              window: Optional[int] = None, sink_tokens: int = 0, seed: int = 1,
              framework: str = "numpy") -> LeakReport:
    """Finds, by experiment, which output rows of fn depend on which positions.

    fn(q, k, v) -> out takes q (batch, length, heads, dim) and k, v (batch,
    length, kv_heads, dim) float32 (NumPy arrays, or torch tensors with
    framework="torch") and returns out (batch, length, heads, dim), float32 or
    float64. It is called length + 2 times: on random base inputs, again on
    the same inputs (the output must not change), then once per position j
    with q, k and v at j replaced by different values. Row i depends on j when
    any bit of it changed; a dependency the mask (causal, window, sink_tokens)
    forbids is a leak. The same experiment as `lookback leakcheck --exec` (docs/leakage.md),
    in-process: with the same seed (1 by default in both) the inputs, and so
    the report, are the same.

    An exception raised by fn propagates unchanged; an output of the wrong
    shape, or holding NaN, is a ValueError.
    """
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework: {framework!r} (expected \"numpy\" or \"torch\")")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    call = fn
    if framework == "torch":
        import torch  # noqa: F401  (the caller asked for tensors)

        def call(q, k, v):
            out = fn(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v))
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu()
                out = (out.float() if out.dtype in (torch.float16, torch.bfloat16) else out).numpy()
            return out
    else:
        def call(q, k, v):
            out = fn(q, k, v)
            return _as_numpy(out, "output of fn") if _is_tensor(out) else np.asarray(out)

    result = _lookback.leakcheck(call, length, heads, kv_heads, dim, batch=batch, causal=causal,
                                 window=window, sink_tokens=sink_tokens, seed=seed)
    leaks = [tuple(p) for p in result["leaks"]]
    return LeakReport(verdict="causal" if not leaks else "leak", leaks=leaks,
                      missing=[tuple(p) for p in result["missing"]],
                      dependency=result["dependency"], per_batch_head=result["per_batch_head"],
                      runs=result["runs"])


def visible_mask(seqlen_q: int, seqlen_k: Optional[int] = None, causal: Causal = "bottom-right",
                 window: Optional[int] = None, sink_tokens: int = 0) -> np.ndarray:
    """bool (seqlen_q, seqlen_k): True where query row i may see key j, from
    the library's mask (the one the kernels use). seqlen_k defaults to
    seqlen_q; sink_tokens=S (with window) keeps keys j < S visible too."""
    return _lookback.visible_mask(seqlen_q, seqlen_k, causal=causal, window=window,
                                  sink_tokens=sink_tokens)


def merge_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> Tuple[Any, Any]:
    """Merges two partial results over disjoint key ranges, exactly:
    lse = log(e^lse_a + e^lse_b), out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.

    out (batch, seqlen, heads, head_dim) with lse (batch, heads, seqlen), as
    attention() returns them, or out (tokens, heads, head_dim) with lse
    (heads, tokens), as the caches return them. An empty part (lse = -inf)
    changes nothing. Returns (out, lse) float32 in the same layout.
    """
    torch_out = _is_tensor(out_a)
    arrays = [np.asarray(_as_numpy(x, name)) for x, name in
              ((out_a, "out_a"), (lse_a, "lse_a"), (out_b, "out_b"), (lse_b, "lse_b"))]
    oa, la, ob, lb = arrays
    if oa.ndim not in (3, 4) or ob.shape != oa.shape:
        raise ValueError(f"out_a, out_b: shapes {oa.shape} and {ob.shape} (expected the same "
                         "(batch, seqlen, heads, head_dim) or (tokens, heads, head_dim))")
    # lse's axes as out's rows: (batch, heads, seqlen) -> (batch, seqlen, heads).
    order = (0, 2, 1) if oa.ndim == 4 else (1, 0)
    expected = tuple(oa.shape[:-1][a] for a in order)
    for name, lse in (("lse_a", la), ("lse_b", lb)):
        if lse.shape != expected:
            raise ValueError(f"{name}: shape {lse.shape} (expected {expected})")
    dim = oa.shape[-1]
    out = np.array(oa, dtype=np.float32, order="C")
    lse = np.ascontiguousarray(la.transpose(order), dtype=np.float32)
    _lookback.merge_rows(out.reshape(-1, dim), lse.reshape(-1),
                         np.ascontiguousarray(ob, dtype=np.float32).reshape(-1, dim),
                         np.ascontiguousarray(lb.transpose(order), dtype=np.float32).reshape(-1))
    lse = np.ascontiguousarray(lse.transpose(order))
    return _like((out, lse), torch_out)


def kernel_info() -> dict:
    """What the kernels use on this CPU: the SIMD target, the targets this
    build can run, AVX-512/AVX512-BF16/AMX and the paths that follow, and a
    one-line description (as `lookback --version` prints)."""
    return _lookback.kernel_info()
