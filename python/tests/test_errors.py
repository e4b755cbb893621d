"""Every bad call raises the stated exception, with the library's message:
ValueError for shapes, dtypes and options, TypeError for argument types,
OSError for files. Never a crash."""

import numpy as np
import pytest

import lookback
from conftest import random_qkv


@pytest.fixture
def qkv(rng):
    return random_qkv(rng, 1, 5, 5, 4, 2, 16)


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v: ([q], k, v, {}), TypeError, "q: expected a NumPy array"),
    (lambda q, k, v: (q, "k", v, {}), TypeError, "k: expected"),
    (lambda q, k, v: (q.astype(np.int32), k, v, {}), ValueError, "q: dtype int32"),
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "q"),
    (lambda q, k, v: (q[..., None], k, v, {}), ValueError, "q"),
    (lambda q, k, v: (q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), {}), ValueError,
     "heads"),
    (lambda q, k, v: (q, k[..., :8], v, {}), ValueError, "head_dim"),
    (lambda q, k, v: (q, k, v[:, :4], {}), ValueError, "v"),
    (lambda q, k, v: (q, k, v, dict(causal="sideways")), ValueError, "causal"),
    (lambda q, k, v: (q, k, v, dict(causal=1.5)), TypeError, "causal"),
    (lambda q, k, v: (q, k, v, dict(window=-1)), ValueError, "window"),
    (lambda q, k, v: (q, k, v, dict(window=2.5)), TypeError, "window"),
    (lambda q, k, v: (q, k, v, dict(window=2, causal="none")), ValueError, "window"),
    (lambda q, k, v: (q, k, v, dict(dtype="f64")), ValueError, "dtype"),
    (lambda q, k, v: (q, k, v, dict(dtype="i4")), ValueError, "dtype"),
    (lambda q, k, v: (q, k, v, dict(softcap=-1.0)), ValueError, "softcap"),
    (lambda q, k, v: (q, k, v, dict(alibi_slopes=np.ones(3, np.float32))), ValueError,
     "alibi_slopes"),
    (lambda q, k, v: (q, k, v, dict(alibi_slopes=np.ones((4, 1), np.float32))), ValueError,
     "alibi_slopes"),
    (lambda q, k, v: (q, k, v, dict(alibi_slopes="steep")), TypeError, "alibi_slopes"),
    (lambda q, k, v: (q, k, v, dict(threads=0)), ValueError, "threads"),
    (lambda q, k, v: (q, k, v, dict(scale="big")), TypeError, ""),
], ids=lambda x: x if isinstance(x, str) else "")
def test_attention_errors(qkv, change, error, match):
    q, k, v, kwargs = change(*qkv)
    with pytest.raises(error, match=match):
        lookback.attention(q, k, v, **kwargs)


def test_nan_is_never_quietly_passed(qkv):
    # NaN in, NaN out (the oracle comparisons elsewhere reject NaN).
    q, k, v = qkv
    q = q.copy()
    q[0, 4, 0, 0] = np.nan
    out = lookback.attention(q, k, v)
    assert np.isnan(out[0, 4, 0]).all() and not np.isnan(out[0, :4]).any()


def test_cache_errors(rng, tmp_path):
    _, k, v = random_qkv(rng, 1, 5, 5, 2, 2, 16)
    with pytest.raises(ValueError, match="kv_heads"):
        lookback.KVCache(4, 0, 16)
    with pytest.raises(ValueError, match="dtype"):
        lookback.KVCache(4, 2, 16, dtype="f64")
    with pytest.raises(ValueError, match="capacity"):
        lookback.KVCache(1 << 50, 2, 16)
    with pytest.raises(TypeError):
        lookback.KVCache("four", 2, 16)
    cache = lookback.KVCache(4, 2, 16)
    with pytest.raises(ValueError, match="appending 5 tokens"):
        cache.append(k[0], v[0])  # 5 tokens into 4
    assert len(cache) == 0  # nothing appended
    with pytest.raises(ValueError, match="kv_heads"):
        cache.append(k[0, :, :1], v[0, :, :1])
    cache.append(k[0, :3], v[0, :3])
    with pytest.raises(ValueError):
        cache.attend(rng.standard_normal((4, 2, 16)).astype(np.float32))  # 4 tokens of 3
    with pytest.raises(ValueError, match="q"):
        cache.attend(rng.standard_normal((1, 2, 8)).astype(np.float32))
    with pytest.raises(TypeError, match="q"):
        cache.attend(None)
    with pytest.raises(OSError):
        lookback.KVCache.load(tmp_path / "missing.lbkv")
    (tmp_path / "junk.lbkv").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(OSError):
        lookback.KVCache.load(tmp_path / "junk.lbkv")
    with pytest.raises(OSError):
        cache.save(tmp_path / "no-such-folder" / "c.lbkv")


def test_pool_errors(rng):
    _, k, v = random_qkv(rng, 1, 9, 9, 1, 1, 8)
    pool = lookback.PagedKVPool(2, 4, 1, 8)
    s = pool.create()
    with pytest.raises(ValueError):
        pool.append(s, k[0], v[0])  # 9 tokens, room for 8
    assert pool.length(s) == 0 and pool.free_blocks == 2
    with pytest.raises(ValueError):
        pool.length(12345)
    with pytest.raises(ValueError):
        pool.fork(12345)
    with pytest.raises(ValueError):
        pool.release(12345)
    with pytest.raises(ValueError):
        lookback.PagedKVPool(4, 0, 1, 8)


def test_leakcheck_errors():
    fn = lambda q, k, v: q  # noqa: E731
    with pytest.raises(ValueError, match="framework"):
        lookback.leakcheck(fn, 4, 1, 1, 8, framework="jax")
    with pytest.raises(TypeError, match="fn"):
        lookback.leakcheck(42, 4, 1, 1, 8)
    with pytest.raises(ValueError, match="heads"):
        lookback.leakcheck(fn, 4, 3, 2, 8)
    with pytest.raises(ValueError):
        lookback.leakcheck(fn, 0, 1, 1, 8)
    with pytest.raises(ValueError, match="window"):
        lookback.leakcheck(fn, 4, 1, 1, 8, causal="none", window=1)


def test_mask_and_merge_errors():
    with pytest.raises(ValueError):
        lookback.visible_mask(-1)
    with pytest.raises(ValueError, match="lse_a"):
        lookback.merge_states(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3)), np.zeros((1, 2, 3, 4)),
                              np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="out_a"):
        lookback.merge_states(np.zeros((2, 4)), np.zeros(2), np.zeros((2, 4)), np.zeros(2))
