"""8-bit K/V storage (int8, fp8e4m3, fp8e5m2) from Python: K and V are
quantized per (token, kv head) row with one f32 scale (docs/semantics.md §9);
Q and all arithmetic stay f32."""

import numpy as np
import pytest

import lookback
from conftest import assert_close, oracle, random_qkv, relative_l2
from test_caches import decode_loop


def int8_rows(x):
    """The int8 rule, written here independently of the library: scale =
    max|x| / 127 per (token, head) row, code = round-half-even(x / scale)
    clamped to +-127, the value attended to = code * scale, all in f32."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    code = np.clip(np.rint(x / safe), -127, 127).astype(np.float32)
    return np.where(scale == 0, np.float32(0), code * scale).astype(np.float32)


@pytest.mark.parametrize("options", [dict(), dict(window=5), dict(causal="top-left", softcap=3.0)],
                         ids=str)
def test_int8_attention_equals_reference_on_quantized_kv(rng, options):
    q, k, v = random_qkv(rng, 2, 37, 41, 4, 2, 24)
    out = lookback.attention(q, k, v, dtype="int8", **options)
    expected = oracle(q, int8_rows(k), int8_rows(v), **options)[0]
    assert relative_l2(out, expected) <= 1e-4


def test_int8_cache_decode_equals_reference_on_quantized_kv(rng):
    q, k, v = random_qkv(rng, 1, 25, 25, 4, 2, 40)
    cache = lookback.KVCache(32, 2, 40, dtype="int8")
    assert cache.dtype == "int8"
    out, _ = decode_loop(cache, q, k, v, prompt=7, chunk=3)
    expected = oracle(q, int8_rows(k), int8_rows(v))[0]
    assert relative_l2(out, expected) <= 1e-4


@pytest.mark.parametrize("storage, bound", [("int8", 3e-2), ("fp8e4m3", 1e-1), ("fp8e5m2", 2e-1)])
def test_8bit_storage_is_near_the_unquantized_result(rng, storage, bound):
    q, k, v = random_qkv(rng, 1, 64, 64, 4, 4, 32)
    out = lookback.attention(q, k, v, dtype=storage)
    assert relative_l2(out, oracle(q, k, v)[0]) <= bound
    pool = lookback.PagedKVPool(8, 16, 4, 32, dtype=storage)
    seq = pool.create()
    pool.append(seq, k[0], v[0])
    last = pool.attend(seq, q[0, -1:])
    assert_close(last, out[0, -1:], "f32")
