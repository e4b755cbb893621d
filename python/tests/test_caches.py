"""KVCache and PagedKVPool: decode equals prefill on the whole sequence."""

import numpy as np
import pytest

import lookback
from conftest import assert_close, assert_lse_close, oracle, random_qkv


def decode_loop(cache, q, k, v, prompt, chunk=1, **options):
    """Appends the first `prompt` tokens, then `chunk` tokens at a time, each
    step attending its queries; returns out, lse like attention() (batch 1)."""
    cache.append(k[0, :prompt], v[0, :prompt])
    outs, lses = [], []
    seqlen = q.shape[1]
    first_query = prompt - (k.shape[1] - seqlen)  # queries before it see only the prompt
    # The prompt's own queries, in one step.
    if first_query > 0:
        out, lse = cache.attend(q[0, :first_query], return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
    for start in range(max(first_query, 0), seqlen, chunk):
        stop = min(start + chunk, seqlen)
        position = k.shape[1] - seqlen + start
        cache.append(k[0, position:position + stop - start], v[0, position:position + stop - start])
        out, lse = cache.attend(q[0, start:stop], return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs)[None], np.concatenate(lses, axis=1)[None]


OPTIONS = [dict(), dict(window=3), dict(softcap=2.5, scale=0.4), dict(alibi=True, window=6)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_decode_equals_attention(rng, options, chunk):
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
    q, k, v = random_qkv(rng, 1, 23, 23, 4, 2, 40)
    cache = lookback.KVCache(64, 2, 40)
    out, lse = decode_loop(cache, q, k, v, prompt=6, chunk=chunk, **options)
    assert len(cache) == 23
    whole, whole_lse = lookback.attention(q, k, v, return_lse=True, **options)
    assert_close(out, whole)
    assert_lse_close(lse, whole_lse)
    assert_close(out, oracle(q, k, v, **options)[0])


@pytest.mark.parametrize("storage", ["bf16", "f16"])
def test_half_cache_matches_reference(rng, storage):
    q, k, v = random_qkv(rng, 1, 30, 30, 2, 1, 64)
    cache = lookback.KVCache(30, 1, 64, dtype=storage)
    out, lse = decode_loop(cache, q, k, v, prompt=10)
    expected, expected_lse = oracle(q, k, v)
    assert_close(out, expected, storage)
    assert_lse_close(lse, expected_lse, storage)


def rotate_half(x, positions, theta):
    """NeoX RoPE on (tokens, heads, head_dim) at the given positions."""
    half = x.shape[-1] // 2
    inv = theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    angle = positions[:, None, None] * inv[None, None, :]
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def test_rope_cache_equals_attention_on_rotated_inputs(rng):
    q, k, v = random_qkv(rng, 1, 12, 12, 2, 1, 16)
    cache = lookback.KVCache(12, 1, 16, rope_theta=10000.0)
    out, _ = decode_loop(cache, q, k, v, prompt=4)
    positions = np.arange(12, dtype=np.float64)
    expected, _ = oracle(rotate_half(q[0], positions, 10000.0)[None],
                         rotate_half(k[0], positions, 10000.0)[None], v)
    assert_close(out, expected)


def test_clear_save_and_load(rng, tmp_path):
    q, k, v = random_qkv(rng, 1, 9, 9, 2, 2, 16)
    cache = lookback.KVCache(16, 2, 16, dtype="bf16")
    cache.append(k[0], v[0])
    before = cache.attend(q[0, -2:])
    cache.save(tmp_path / "c.lbkv")
    loaded = lookback.KVCache.load(tmp_path / "c.lbkv")
    assert (len(loaded), loaded.capacity, loaded.kv_heads, loaded.head_dim, loaded.dtype) == \
        (9, 16, 2, 16, "bf16")
    np.testing.assert_array_equal(loaded.attend(q[0, -2:]), before)
    cache.clear()
    assert len(cache) == 0 and cache.capacity == 16


def test_paged_pool_equals_attention_and_forks_diverge(rng):
    heads, kv_heads, dim, prefix, extra = 4, 2, 32, 11, 7
    _, k, v = random_qkv(rng, 1, prefix + extra, prefix + extra, heads, kv_heads, dim)
    _, k2, v2 = random_qkv(rng, 1, extra, extra, heads, kv_heads, dim)
    q = rng.standard_normal((1, 3, heads, dim)).astype(np.float32)
    pool = lookback.PagedKVPool(num_blocks=16, block_size=4, kv_heads=kv_heads, head_dim=dim)
    a = pool.create()
    pool.append(a, k[0, :prefix], v[0, :prefix])
    b = pool.fork(a)
    assert pool.block_table(b) == pool.block_table(a) and pool.length(b) == prefix
    used = 16 - pool.free_blocks
    pool.append(a, k[0, prefix:], v[0, prefix:])
    pool.append(b, k2[0], v2[0])
    # The full blocks of the prefix stay shared; the partly filled one was copied.
    shared = prefix // 4
    assert pool.block_table(a)[:shared] == pool.block_table(b)[:shared]
    assert pool.block_table(a)[shared] != pool.block_table(b)[shared]
    assert pool.free_blocks < 16 - used
    k_b = np.concatenate([k[:, :prefix], k2], axis=1)
    v_b = np.concatenate([v[:, :prefix], v2], axis=1)
    for sequence, keys, values in ((a, k, v), (b, k_b, v_b)):
        out, lse = pool.attend(sequence, q[0], return_lse=True)
        expected, expected_lse = oracle(q, keys, values)
        assert_close(out[None], expected)
        assert_lse_close(lse[None], expected_lse)
    assert sorted(pool.sequences()) == sorted([a, b])
    pool.release(a)
    pool.release(b)
    assert pool.free_blocks == 16 and pool.sequences() == []


def test_paged_pool_save_and_load(rng, tmp_path):
    _, k, v = random_qkv(rng, 1, 10, 10, 2, 1, 8)
    pool = lookback.PagedKVPool(8, 3, 1, 8)
    s = pool.create()
    pool.append(s, k[0], v[0])
    pool.save(tmp_path / "p.lbkv")
    loaded = lookback.PagedKVPool.load(tmp_path / "p.lbkv")
    assert loaded.block_table(s) == pool.block_table(s) and loaded.free_blocks == pool.free_blocks
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.attend(s, q), pool.attend(s, q))
