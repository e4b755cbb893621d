"""Learned sink logits, StreamingLLM sink tokens and packed varlen batches
from Python, against a NumPy float64 reference written here (independent of
the library's kernels and of its own reference)."""

import numpy as np
import pytest

import lookback
from conftest import assert_close, assert_lse_close, random_qkv, torch_or_skip

# ---- the NumPy reference ------------------------------------------------------


def numpy_mask(seqlen_q, seqlen_k, causal="bottom-right", window=None, sink_tokens=0):
    """docs/semantics.md: p(i) = i + seqlen_k - seqlen_q (bottom-right) or i
    (top-left); j visible iff j <= p(i) and (j >= p(i) - W or j < S)."""
    rows = np.arange(seqlen_q)[:, None]
    keys = np.arange(seqlen_k)[None, :]
    position = rows + (seqlen_k - seqlen_q if causal == "bottom-right" else 0)
    visible = keys <= position
    if window is not None:
        visible &= (keys >= position - window) | (keys < sink_tokens)
    return visible


def numpy_attention(q, k, v, visible, sink_logits=None, scale=None):
    """q (batch, seqlen_q, heads, dim), k, v (batch, seqlen_k, kv_heads, dim),
    visible (seqlen_q, seqlen_k): out, lse in float64. A sink logit joins the
    denominator only; a row with no visible key gives 0 and lse = sink (or -inf)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, seqlen_q, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    out = np.zeros(q.shape)
    lse = np.full((batch, heads, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(heads):
            scores = scale * q[b, :, h] @ k[b, :, h // group].T
            scores = np.where(visible, scores, -np.inf)
            sink = -np.inf if sink_logits is None else float(sink_logits[h])
            shift = np.maximum(scores.max(axis=1, initial=-np.inf), sink)
            finite = np.isfinite(shift)
            shift = np.where(finite, shift, 0.0)
            weights = np.exp(scores - shift[:, None])
            total = weights.sum(axis=1) + np.exp(sink - shift)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[b, :, h] = np.where(total[:, None] > 0,
                                        weights @ v[b, :, h // group] / total[:, None], 0.0)
                lse[b, h] = np.where(total > 0, shift + np.log(total), -np.inf)
    return out, lse


def sinks_for(heads, rng):
    return rng.uniform(-1.0, 3.0, heads).astype(np.float32)


# ---- the mask -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 12), (5, 12), (12, 5)], ids=str)
@pytest.mark.parametrize("causal", ["bottom-right", "top-left"])
def test_visible_mask_with_sink_tokens(shape, causal):
    mask = lookback.visible_mask(*shape, causal=causal, window=3, sink_tokens=2)
    expected = numpy_mask(*shape, causal=causal, window=3, sink_tokens=2)
    assert (mask == expected).all()
    # The sinks add something: without them the mask differs.
    if shape == (12, 12):
        assert (mask != numpy_mask(*shape, causal=causal, window=3)).any()


# ---- learned sink logits --------------------------------------------------------

# (seqlen_q, seqlen_k, mask): rows with no visible key are reachable with
# bottom-right seqlen_q > seqlen_k (the first rows) and top-left with
# seqlen_q > seqlen_k + W (the last rows).
SINK_LOGIT_CASES = [
    (17, 17, dict()),
    (9, 31, dict(window=5)),
    (13, 6, dict()),
    (13, 6, dict(causal="top-left", window=2)),
    (20, 20, dict(window=4, sink_tokens=3)),
]


@pytest.mark.parametrize("case", SINK_LOGIT_CASES, ids=str)
def test_sink_logits_match_numpy(rng, case):
    seqlen_q, seqlen_k, mask = case
    q, k, v = random_qkv(rng, 2, seqlen_q, seqlen_k, 4, 2, 16)
    sinks = sinks_for(4, rng)
    expected, expected_lse = numpy_attention(q, k, v, numpy_mask(seqlen_q, seqlen_k, **mask), sinks)
    for function in (lookback.attention, lookback.reference_attention):
        out, lse = function(q, k, v, sink_logits=sinks, return_lse=True, **mask)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        assert_close(out, expected)
        assert_lse_close(lse, expected_lse)
    empty = ~numpy_mask(seqlen_q, seqlen_k, **mask).any(axis=1)
    if seqlen_q > seqlen_k:
        assert empty.any()  # the case reaches rows with no visible key
        assert (out[:, empty] == 0).all()
        assert np.allclose(lse[:, :, empty], sinks[None, :, None])
    # The sink changes every row that has keys (it is not ignored).
    plain = lookback.attention(q, k, v, **mask)
    assert not np.allclose(out[:, ~empty], plain[:, ~empty])


def test_sink_logits_through_split_kv_cache(rng):
    # 2100 keys and one kv head: the cache splits the keys into parts merged
    # through their LSEs; the sink joins once, after the merge.
    length, heads = 2100, 2
    q, k, v = random_qkv(rng, 1, 3, length, heads, 1, 8)
    sinks = sinks_for(heads, rng)
    cache = lookback.KVCache(length, 1, 8)
    cache.append(k[0], v[0])
    out, lse = cache.attend(q[0], sink_logits=sinks, return_lse=True)
    expected, expected_lse = numpy_attention(q, k, v, numpy_mask(3, length), sinks)
    assert np.isfinite(out).all()
    assert_close(out[None], expected)
    assert_lse_close(lse[None], expected_lse)


# ---- sink tokens on every path ----------------------------------------------------


@pytest.mark.parametrize("case", [(24, 24, "bottom-right"), (10, 24, "bottom-right"),
                                  (24, 15, "top-left")], ids=str)
def test_sink_tokens_prefill_match_numpy(rng, case):
    seqlen_q, seqlen_k, causal = case
    q, k, v = random_qkv(rng, 1, seqlen_q, seqlen_k, 4, 1, 24)
    mask = dict(causal=causal, window=4, sink_tokens=3)
    out, lse = lookback.attention(q, k, v, return_lse=True, **mask)
    expected, expected_lse = numpy_attention(q, k, v, numpy_mask(seqlen_q, seqlen_k, **mask))
    assert np.isfinite(out).all()
    assert_close(out, expected)
    assert_lse_close(lse, expected_lse)
    assert not np.allclose(out, lookback.attention(q, k, v, causal=causal, window=4))


def decode_steps(attend_step, append, q, k, v, prompt, chunk):
    """The first `prompt` tokens appended and attended at once, then `chunk`
    at a time; out (1, seqlen, heads, dim) and lse (1, heads, seqlen)."""
    outs, lses = [], []
    for start in [0] + list(range(prompt, q.shape[1], chunk)):
        stop = prompt if start == 0 else min(start + chunk, q.shape[1])
        append(k[0, start:stop], v[0, start:stop])
        out, lse = attend_step(q[0, start:stop])
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs)[None], np.concatenate(lses, axis=1)[None]


@pytest.mark.parametrize("path", ["cache", "pool", "ring"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_sink_tokens_and_logits_through_caches(rng, path, chunk):
    q, k, v = random_qkv(rng, 1, 30, 30, 4, 2, 16)
    sinks = sinks_for(4, rng)
    options = dict(window=5, sink_tokens=2, sink_logits=sinks, return_lse=True)
    if path in ("cache", "ring"):
        # The ring: 2 sink slots, the window's 5 and a step's; it wraps often.
        cache = (lookback.KVCache(30, 2, 16) if path == "cache" else
                 lookback.KVCache(2 + 5 + max(chunk, 7), 2, 16, ring=True, ring_sink_tokens=2))
        append, attend = cache.append, lambda x: cache.attend(x, **options)
    else:
        pool = lookback.PagedKVPool(16, 4, 2, 16)
        pool.create()  # a sequence before ours: its blocks are not the first ones
        sequence = pool.create()
        append = lambda kk, vv: pool.append(sequence, kk, vv)  # noqa: E731
        attend = lambda x: pool.attend(sequence, x, **options)  # noqa: E731
    out, lse = decode_steps(attend, append, q, k, v, prompt=7, chunk=chunk)
    expected, expected_lse = numpy_attention(
        q, k, v, numpy_mask(30, 30, window=5, sink_tokens=2), sinks)
    assert np.isfinite(out).all()
    assert_close(out, expected)
    assert_lse_close(lse, expected_lse)
    if path == "ring":
        assert len(cache) == 30 and cache.first_kept == 30 - 12 and cache.ring_sink_tokens == 2


def test_ring_cache_refusals(rng):
    q, k, v = random_qkv(rng, 1, 20, 20, 4, 2, 16)
    ring = lookback.KVCache(8, 2, 16, ring=True, ring_sink_tokens=2)  # 6 window slots
    assert ring.ring_sink_tokens == 2 and lookback.KVCache(8, 2, 16).ring_sink_tokens is None
    with pytest.raises(ValueError, match="at most 6 tokens at once"):
        ring.append(k[0, :7], v[0, :7])
    for start in range(0, 18, 6):
        ring.append(k[0, start:start + 6], v[0, start:start + 6])
    with pytest.raises(ValueError, match="window 6 with 1 new tokens reaches key 11"):
        ring.attend(q[0, 17:18], window=6)
    with pytest.raises(ValueError, match="no window"):
        ring.attend(q[0, 17:18])
    assert np.isfinite(ring.attend(q[0, 17:18], window=5, sink_tokens=2)).all()
    with pytest.raises(ValueError, match="without ring=True"):
        lookback.KVCache(8, 2, 16, ring_sink_tokens=2)
    with pytest.raises(ValueError, match="ring sink_tokens: 8"):
        lookback.KVCache(8, 2, 16, ring=True, ring_sink_tokens=8)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8"])
def test_ring_cache_save_and_load(rng, tmp_path, dtype):
    """A wrapped ring saved and loaded is the same ring: it attends bit for bit
    like the original and goes on identically; a cache that is not a ring
    loads as one that is not."""
    q, k, v = random_qkv(rng, 1, 60, 60, 4, 2, 16)
    ring = lookback.KVCache(2 + 5 + 3, 2, 16, dtype=dtype, rope_theta=10000.0, ring=True,
                            ring_sink_tokens=2)
    for start in range(0, 40, 4):
        ring.append(k[0, start:start + 4], v[0, start:start + 4])
    path = tmp_path / "ring.lbkv"
    ring.save(str(path))
    loaded = lookback.KVCache.load(str(path))
    assert loaded.ring_sink_tokens == 2 and loaded.capacity == 10
    assert len(loaded) == 40 and loaded.first_kept == ring.first_kept == 40 - 8
    options = dict(window=5, sink_tokens=2, return_lse=True)
    for end in (40, 43, 47):
        if end > len(ring):
            for cache in (ring, loaded):
                cache.append(k[0, len(cache):end], v[0, len(cache):end])
        for a, b in zip(ring.attend(q[0, end - 3:end], **options),
                        loaded.attend(q[0, end - 3:end], **options)):
            assert a.tobytes() == b.tobytes()
    plain = lookback.KVCache(10, 2, 16, dtype=dtype)
    plain.append(k[0, :10], v[0, :10])
    plain.save(str(tmp_path / "plain.lbkv"))
    assert lookback.KVCache.load(str(tmp_path / "plain.lbkv")).ring_sink_tokens is None


# ---- varlen -----------------------------------------------------------------------

# Per sequence (seqlen_q, seqlen_k): empty, one token, more queries than keys
# (empty rows), seqlen_q != seqlen_k, a long one.
LENGTHS = [(0, 0), (1, 1), (7, 3), (0, 5), (113, 113), (7, 40), (1, 0)]


def packed(rng, lengths, heads=4, kv_heads=2, dim=16):
    total_q = sum(n for n, _ in lengths)
    total_k = sum(n for _, n in lengths)
    q = rng.standard_normal((total_q, heads, dim)).astype(np.float32)
    k = rng.standard_normal((total_k, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((total_k, kv_heads, dim)).astype(np.float32)
    cu_q = np.concatenate([[0], np.cumsum([n for n, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([n for _, n in lengths])]).astype(np.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal="top-left", window=3),
    dict(window=4, sink_tokens=2, sinks=True),
    dict(softcap=3.0, alibi=True),
], ids=str)
def test_varlen_equals_each_sequence_alone(rng, options):
    options = dict(options)
    if options.pop("sinks", False):
        options["sink_logits"] = sinks_for(4, rng)
    if options.pop("alibi", False):
        options["alibi_slopes"] = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
    q, k, v, cu_q, cu_k = packed(rng, LENGTHS)
    out, lse = lookback.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    mask_options = {key: options[key] for key in ("causal", "window", "sink_tokens")
                    if key in options}
    for b in range(len(LENGTHS)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if rows.stop == rows.start:
            continue
        alone, alone_lse = lookback.attention(q[None, rows], k[None, keys], v[None, keys],
                                              return_lse=True, **options)
        assert np.array_equal(out[rows], alone[0])
        assert np.array_equal(lse[:, rows], alone_lse[0])
        if "alibi_slopes" not in options and "softcap" not in options:
            expected, expected_lse = numpy_attention(
                q[None, rows], k[None, keys], v[None, keys],
                numpy_mask(rows.stop - rows.start, keys.stop - keys.start, **mask_options),
                options.get("sink_logits"))
            assert_close(out[None, rows], expected)
            assert_lse_close(lse[None, :, rows], expected_lse)


def test_flash_attn_varlen_func(rng):
    torch = torch_or_skip()
    q, k, v, cu_q, cu_k = packed(rng, LENGTHS)
    args = [torch.from_numpy(x) for x in (q, k, v, cu_q, cu_k)]
    out, lse, probs = lookback.flash_attn_varlen_func(
        *args, 113, 113, causal=True, window_size=(3, 0), return_attn_probs=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and probs is None
    expected, expected_lse = lookback.attention_varlen(q, k, v, cu_q, cu_k, window=3,
                                                       return_lse=True)
    assert np.array_equal(out.numpy(), expected)
    assert np.array_equal(lse.numpy(), expected_lse)
    plain = lookback.flash_attn_varlen_func(*args, 113, 113)  # causal=False: every key
    assert_close(plain.numpy(), lookback.attention_varlen(q, k, v, cu_q, cu_k, causal=False))
    half = lookback.flash_attn_varlen_func(*(x.half() for x in args[:3]), *args[3:], 113, 113,
                                           causal=True)
    assert half.dtype == torch.float16
    assert_close(half.float().numpy(), lookback.attention_varlen(q, k, v, cu_q, cu_k), "f16")
    with pytest.raises(ValueError, match=r"max_seqlen_q: 100 \(expected at least 113"):
        lookback.flash_attn_varlen_func(*args, 100, 113)
    with pytest.raises(ValueError, match=r"max_seqlen_k: 112 \(expected at least 113"):
        lookback.flash_attn_varlen_func(*args, 113, 112)
    # An upper bound is enough, as in FlashAttention (padded batch maxima).
    bound = lookback.flash_attn_varlen_func(*args, 128, 4096)
    assert np.array_equal(bound.numpy(), plain.numpy())
    with pytest.raises(ValueError, match="dropout_p"):
        lookback.flash_attn_varlen_func(*args, 113, 113, dropout_p=0.1)


def test_varlen_on_tensors_and_lists(rng):
    torch = torch_or_skip()
    q, k, v, cu_q, cu_k = packed(rng, [(3, 5), (4, 4)])
    out = lookback.attention_varlen(*(torch.from_numpy(x) for x in (q, k, v)),
                                    torch.from_numpy(cu_q).long(), list(cu_k))
    assert isinstance(out, torch.Tensor)
    assert np.array_equal(out.numpy(), lookback.attention_varlen(q, k, v, cu_q, cu_k))


# ---- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("cu_q, match", [
    ([0, 5, 3, 10], r"cu_seqlens_q: entry 2 is 3, below entry 1 = 5"),
    ([0, 3, 6, 9], r"cu_seqlens_q: ends at 9 \(expected 10"),
    ([1, 3, 6, 10], r"cu_seqlens_q: starts at 1 \(expected 0\)"),
    ([0, -2, 6, 10], r"cu_seqlens_q: entry 1 is -2 \(expected offsets >= 0\)"),
    ([0, 10], r"cu_seqlens_k: 4 entries \(expected 2"),
    ([0], r"cu_seqlens_q: 1 entries"),
    (np.array([0.0, 3, 6, 10]), r"cu_seqlens_q: dtype float64 \(expected int32 or int64\)"),
    (np.zeros((2, 2), np.int32), r"cu_seqlens_q: 2 dimensions"),
], ids=str)
def test_bad_cu_seqlens(rng, cu_q, match):
    q, k, v, _, cu_k = packed(rng, [(3, 3), (3, 3), (4, 4)])
    cu_q = cu_q if isinstance(cu_q, np.ndarray) else np.array(cu_q, dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        lookback.attention_varlen(q, k, v, cu_q, cu_k)


def calls(q, k, v):
    """Every entry point with sink arguments, as f(**options)."""
    cache = lookback.KVCache(8, 2, 16)
    cache.append(k[0], v[0])
    pool = lookback.PagedKVPool(4, 4, 2, 16)
    sequence = pool.create()
    pool.append(sequence, k[0], v[0])
    cu = np.array([0, 8], np.int32)
    return {
        "attention": lambda **o: lookback.attention(q, k, v, **o),
        "reference": lambda **o: lookback.reference_attention(q, k, v, **o),
        "varlen": lambda **o: lookback.attention_varlen(q[0], k[0], v[0], cu, cu, **o),
        "cache": lambda **o: cache.attend(q[0], **o),
        "pool": lambda **o: pool.attend(sequence, q[0], **o),
    }


@pytest.mark.parametrize("options, match", [
    (dict(sink_logits=np.zeros(5, np.float32)), r"sink_logits: 5 logits \(expected heads = 4\)"),
    (dict(sink_logits=np.zeros((4, 1), np.float32)), r"sink_logits: 2 dimensions"),
    (dict(sink_logits=np.array([0, np.nan, 0, 0], np.float32)),
     r"sink_logits: logit nan of head 1 \(expected finite\)"),
    (dict(sink_logits=np.array([0, 0, 0, np.inf], np.float32)),
     r"sink_logits: logit inf of head 3 \(expected finite\)"),
    (dict(sink_tokens=2), r"sink_tokens: 2 without a window"),
    (dict(sink_tokens=-1, window=2), r"sink_tokens: -1 \(expected >= 0\)"),
], ids=str)
def test_sink_argument_errors(rng, options, match):
    q, k, v = random_qkv(rng, 1, 8, 8, 4, 2, 16)
    for name, call in calls(q, k, v).items():
        with pytest.raises(ValueError, match=match):
            call(**options)
    if "sink_tokens" in options:
        with pytest.raises(ValueError, match=match):
            lookback.visible_mask(8, **options)


# ---- the leak check ---------------------------------------------------------------


def test_leakcheck_with_sink_tokens():
    # A StreamingLLM function (window 2, sinks 0 and 1) is causal against the
    # mask with sinks, and leaks exactly the sink columns against the window alone.
    def streaming(q, k, v):
        out, _ = numpy_attention(q, k, v, numpy_mask(8, 8, window=2, sink_tokens=2))
        return out.astype(np.float32)

    report = lookback.leakcheck(streaming, 8, 2, 1, 8, window=2, sink_tokens=2)
    assert report.verdict == "causal" and report.missing == []
    report = lookback.leakcheck(streaming, 8, 2, 1, 8, window=2)
    assert report.verdict == "leak"
    assert report.leaks == [(i, j) for i in range(8) for j in (0, 1) if j < i - 2]
    with pytest.raises(ValueError, match="sink_tokens: 2 without a window"):
        lookback.leakcheck(streaming, 8, 2, 1, 8, sink_tokens=2)
