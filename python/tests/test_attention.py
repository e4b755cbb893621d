"""lookback.attention and flash_attn_func against the float64 reference."""

import numpy as np
import pytest

import lookback
from conftest import assert_close, assert_lse_close, oracle, random_qkv

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim): odd sizes, GQA, MQA,
# more queries than keys (empty rows), one token.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 7, 7, 4, 2, 16),
    (1, 13, 29, 6, 3, 24),
    (2, 65, 130, 4, 1, 40),
    (1, 37, 20, 2, 2, 64),
    (1, 70, 70, 2, 1, 96),
]
MASKS = [
    dict(causal="bottom-right"),
    dict(causal="top-left"),
    dict(causal="none"),
    dict(causal="bottom-right", window=0),
    dict(causal="bottom-right", window=5),
    dict(causal="top-left", window=3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_prefill_sweep_matches_reference(rng, shape, mask):
    q, k, v = random_qkv(rng, *shape)
    out, lse = lookback.attention(q, k, v, return_lse=True, **mask)
    expected_out, expected_lse = oracle(q, k, v, **mask)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert lse.shape == (shape[0], shape[3], shape[1])
    assert_close(out, expected_out)
    assert_lse_close(lse, expected_lse)


@pytest.mark.parametrize("options", [
    dict(softcap=5.0),
    dict(scale=0.3),
    dict(alibi=True),
    dict(alibi=True, softcap=2.0, window=4),
    dict(alibi=True, causal="top-left"),
], ids=str)
def test_score_options_match_reference(rng, options):
    options = dict(options)
    q, k, v = random_qkv(rng, 2, 19, 33, 4, 2, 32)
    if options.pop("alibi", False):
        options["alibi_slopes"] = (2.0 ** -np.arange(1, 5)).astype(np.float32)
    out, lse = lookback.attention(q, k, v, return_lse=True, **options)
    expected_out, expected_lse = oracle(q, k, v, **options)
    assert_close(out, expected_out)
    assert_lse_close(lse, expected_lse)


@pytest.mark.parametrize("storage", ["bf16", "f16"])
@pytest.mark.parametrize("mask", [MASKS[0], MASKS[4]], ids=str)
def test_half_storage_matches_reference(rng, storage, mask):
    q, k, v = random_qkv(rng, 1, 45, 70, 4, 2, 64)
    out, lse = lookback.attention(q, k, v, dtype=storage, return_lse=True, **mask)
    expected_out, expected_lse = oracle(q, k, v, **mask)
    assert_close(out, expected_out, storage)
    assert_lse_close(lse, expected_lse, storage)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_inputs(rng, dtype):
    q, k, v = random_qkv(rng, 2, 11, 17, 4, 4, 16, dtype=dtype)
    out = lookback.attention(q, k, v)
    assert out.dtype == np.float32
    expected, _ = oracle(q, k, v)  # from the inputs as given
    assert_close(out, expected)


def test_transposed_views_are_read_in_place(rng):
    # (B, H, S, D) arrays seen as (B, S, H, D): strides, not copies.
    q_bhsd = rng.standard_normal((2, 4, 23, 32)).astype(np.float32)
    k_bhsd = rng.standard_normal((2, 2, 31, 32)).astype(np.float32)
    v_bhsd = rng.standard_normal((2, 2, 31, 32)).astype(np.float32)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_bhsd, k_bhsd, v_bhsd))
    assert not q.flags.c_contiguous
    out = lookback.attention(q, k, v, causal="top-left", window=6)
    expected, _ = oracle(q, k, v, causal="top-left", window=6)
    assert_close(out, expected)


def test_sliced_and_reversed_views(rng):
    q, k, v = random_qkv(rng, 3, 40, 60, 4, 2, 48)
    q_view = q[::2, ::-2, :, 8:40]          # every other batch, reversed rows, a D slice
    k_view = k[::2, 1::2, :, 8:40]
    v_view = v[::2, ::-2, :, 8:40]
    out = lookback.attention(q_view, k_view, v_view, softcap=3.0)
    expected, _ = oracle(q_view, k_view, v_view, softcap=3.0)
    assert_close(out, expected)


def test_the_library_oracle_is_plain_attention(rng):
    # One independent check of the layout: the oracle against NumPy einsums.
    q, k, v = random_qkv(rng, 2, 9, 12, 4, 2, 8, dtype=np.float64)
    group = 4 // 2
    kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(8)
    scores = np.where(lookback.visible_mask(9, 12), scores, -np.inf)
    lse = np.log(np.exp(scores).sum(-1))
    expected = np.einsum("bhqk,bkhd->bqhd", np.exp(scores - lse[..., None]), vv)
    out, out_lse = lookback.reference_attention(q, k, v, return_lse=True)
    assert_close(out, expected)
    assert_close(out_lse, lse)


def test_rows_without_keys_are_zero_with_minus_infinity(rng):
    q, k, v = random_qkv(rng, 1, 10, 4, 2, 2, 16)
    out, lse = lookback.attention(q, k, v, return_lse=True)  # bottom-right: rows 0..5 see nothing
    assert (out[:, :6] == 0).all() and np.isneginf(lse[:, :, :6]).all()
    assert np.isfinite(lse[:, :, 6:]).all()


def test_causal_booleans(rng):
    q, k, v = random_qkv(rng, 1, 5, 8, 2, 1, 16)
    np.testing.assert_array_equal(lookback.attention(q, k, v, causal=True),
                                  lookback.attention(q, k, v, causal="bottom-right"))
    np.testing.assert_array_equal(lookback.attention(q, k, v, causal=False),
                                  lookback.attention(q, k, v, causal="none"))


def test_thread_count_does_not_change_the_result(rng):
    q, k, v = random_qkv(rng, 2, 150, 150, 4, 2, 64)
    np.testing.assert_array_equal(lookback.attention(q, k, v, threads=1),
                                  lookback.attention(q, k, v, threads=2))


def test_inputs_are_not_written(rng):
    q, k, v = random_qkv(rng, 1, 9, 9, 2, 1, 16)
    copies = [x.copy() for x in (q, k, v)]
    lookback.attention(q, k, v, dtype="bf16")
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)


def test_visible_mask():
    expected = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(lookback.visible_mask(3, 5, window=2), expected)
    assert lookback.visible_mask(4).sum() == 10  # 4 * 5 / 2
    assert lookback.visible_mask(4, causal="none").all()
    np.testing.assert_array_equal(lookback.visible_mask(2, 4, causal="top-left"),
                                  [[1, 0, 0, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("layout", ["prefill", "cache"])
def test_merge_states_of_two_key_ranges_equals_the_whole(rng, layout):
    q, k, v = random_qkv(rng, 2, 6, 20, 4, 2, 16)
    if layout == "cache":
        q, k, v = q[0], k[0], v[0]
        call = lambda kk, vv: lookback.attention(q[None], kk[None], vv[None], causal="none",  # noqa: E731
                                                 return_lse=True)
        first = [x[0] for x in call(k[:7], v[:7])]
        second = [x[0] for x in call(k[7:], v[7:])]
        whole = [x[0] for x in call(k, v)]
    else:
        call = lambda kk, vv: lookback.attention(q, kk, vv, causal="none", return_lse=True)  # noqa: E731
        first, second, whole = call(k[:, :7], v[:, :7]), call(k[:, 7:], v[:, 7:]), call(k, v)
    out, lse = lookback.merge_states(first[0], first[1], second[0], second[1])
    assert_close(out, whole[0])
    assert_close(lse, whole[1])


def test_merge_states_with_an_empty_part(rng):
    out = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    lse = rng.standard_normal((1, 2, 3)).astype(np.float32)
    merged, merged_lse = lookback.merge_states(out, lse, np.zeros_like(out),
                                               np.full_like(lse, -np.inf))
    np.testing.assert_array_equal(merged, out)
    np.testing.assert_array_equal(merged_lse, lse)


# ---- flash_attn_func ----------------------------------------------------------

def test_flash_attn_func_is_bottom_right_causal(rng):
    q, k, v = random_qkv(rng, 2, 9, 14, 4, 2, 32)
    out = lookback.flash_attn_func(q, k, v, causal=True)
    assert_close(out, oracle(q, k, v, causal="bottom-right")[0])
    out = lookback.flash_attn_func(q, k, v)  # causal=False: every key
    assert_close(out, oracle(q, k, v, causal="none")[0])


def test_flash_attn_func_window_scale_softcap_alibi(rng):
    q, k, v = random_qkv(rng, 1, 12, 12, 2, 1, 16)
    slopes = np.array([0.5, 0.25], dtype=np.float32)
    for right in (0, -1):
        out, lse, probs = lookback.flash_attn_func(
            q, k, v, softmax_scale=0.2, causal=True, window_size=(3, right), softcap=4.0,
            alibi_slopes=slopes, return_attn_probs=True)
        expected_out, expected_lse = oracle(q, k, v, window=3, scale=0.2, softcap=4.0,
                                            alibi_slopes=slopes)
        assert probs is None
        assert_close(out, expected_out)
        assert_lse_close(lse, expected_lse)


def test_flash_attn_func_keeps_float16(rng):
    q, k, v = random_qkv(rng, 1, 8, 8, 2, 2, 16, dtype=np.float16)
    out = lookback.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == np.float16
    assert_close(out, oracle(q, k, v)[0], "f16")


@pytest.mark.parametrize("kwargs", [
    dict(dropout_p=0.1),
    dict(window_size=(2, 2), causal=True),
    dict(window_size=(2, 0)),           # a window without causal
    dict(window_size=(-1, 3), causal=True),
], ids=str)
def test_flash_attn_func_refuses_what_it_cannot_do(rng, kwargs):
    q, k, v = random_qkv(rng, 1, 4, 4, 1, 1, 8)
    with pytest.raises(ValueError):
        lookback.flash_attn_func(q, k, v, **kwargs)


def test_version_and_kernel_info():
    assert lookback.__version__.count(".") == 2
    info = lookback.kernel_info()
    assert info["target"] in info["targets"]
    assert info["target"] in info["description"]


def test_out_is_written_in_place(rng):
    q, k, v = random_qkv(rng, 2, 10, 12, 4, 2, 16)
    expected, expected_lse = lookback.attention(q, k, v, window=3, return_lse=True)
    buffer = np.full((2, 4, 10, 16), np.nan, dtype=np.float32)  # (B, H, S, D)
    out = buffer.transpose(0, 2, 1, 3)
    result, lse = lookback.attention(q, k, v, window=3, return_lse=True, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lse, expected_lse)


@pytest.mark.parametrize("make_out, match", [
    (lambda q: q, "overlaps q"),
    (lambda q: np.zeros(q.shape, np.float64), "out: dtype"),
    (lambda q: np.zeros(q.shape[:3] + (8,), np.float32), "out: shape"),
    (lambda q: np.broadcast_to(np.zeros(1, np.float32), q.shape), "read-only"),
], ids=["overlap", "dtype", "shape", "read-only"])
def test_bad_out(rng, make_out, match):
    q, k, v = random_qkv(rng, 1, 4, 4, 2, 2, 16)
    with pytest.raises(ValueError, match=match):
        lookback.attention(q, k, v, out=make_out(q))


def _attend_in_child(q, k, v, expected, queue):
    queue.put(bool(np.array_equal(lookback.attention(q, k, v, threads=2), expected)))


def test_a_forked_child_can_attend(rng):
    # The parent's contexts (and their threads) exist before the fork.
    import multiprocessing

    q, k, v = random_qkv(rng, 1, 70, 70, 2, 1, 32)
    expected = lookback.attention(q, k, v, threads=2)
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_attend_in_child, args=(q, k, v, expected, queue))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in attention")
    assert child.exitcode == 0 and queue.get(timeout=10)


def test_threads_attending_at_once_get_the_serial_results(rng):
    # The GIL is released during the kernels: each thread borrows a context.
    import threading

    problems = [random_qkv(rng, 1, 60 + 7 * i, 60 + 7 * i, 4, 2, 32) for i in range(4)]
    expected = [lookback.attention(*p, threads=1) for p in problems]
    results = [[None] * 3 for _ in problems]

    def work(index):
        for repeat in range(3):
            results[index][repeat] = lookback.attention(*problems[index], threads=1 + repeat % 2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index, runs in enumerate(results):
        for result in runs:
            np.testing.assert_array_equal(result, expected[index])
