"""Shared helpers of the Python suite: random inputs, the oracle, the
tolerances (those of tests/testing/, DESIGN.md §4)."""

import zlib

import numpy as np
import pytest

import lookback

F32_TOLERANCE = 1e-5   # relative L2 against the float64 reference, f32 storage
HALF_TOLERANCE = 1e-2  # bf16 / f16 storage


def tolerance(storage="f32"):
    return F32_TOLERANCE if storage == "f32" else HALF_TOLERANCE


def random_qkv(rng, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype=np.float32):
    q = rng.standard_normal((batch, seqlen_q, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, seqlen_k, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, seqlen_k, kv_heads, head_dim)).astype(dtype)
    return q, k, v


def oracle(q, k, v, **options):
    """The library's float64 reference on contiguous float64 copies, so that
    it never shares a strided view's reading with the path under test."""
    copies = [np.ascontiguousarray(np.asarray(x), dtype=np.float64) for x in (q, k, v)]
    return lookback.reference_attention(*copies, return_lse=True, **options)


def relative_l2(actual, expected):
    """||actual - expected|| / ||expected||; NaN anywhere fails."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    assert not np.isnan(actual).any(), "NaN in the result"
    norm = np.linalg.norm(expected)
    error = np.linalg.norm(actual - expected)
    return error / norm if norm > 0 else error


def assert_close(actual, expected, storage="f32"):
    error = relative_l2(actual, expected)
    assert error <= tolerance(storage), f"relative L2 error {error:.3g} > {tolerance(storage)}"


def assert_lse_close(actual, expected, storage="f32"):
    """LSE: -inf exactly where expected, the rest within the tolerance."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    empty = np.isneginf(expected)
    assert (np.isneginf(actual) == empty).all()
    if (~empty).any():
        assert_close(actual[~empty], expected[~empty], storage)


@pytest.fixture
def rng(request):
    # A seed of each test's own (its id), the same on every run.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def torch_or_skip():
    """torch (Debian's python3-torch) or a clear skip: it is optional."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (Debian: python3-torch); torch tests skipped")
    return torch
