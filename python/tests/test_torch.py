"""The same calls on CPU torch tensors (Debian's python3-torch, optional):
torch in, torch out. Skipped, with the reason shown, when torch is missing."""

import numpy as np
import pytest

import lookback
from conftest import assert_close, assert_lse_close, oracle, random_qkv, torch_or_skip


@pytest.fixture
def torch():
    return torch_or_skip()


def tensors(torch, *arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("mask", [dict(), dict(causal="top-left", window=4), dict(causal=False)],
                         ids=str)
def test_attention_on_tensors(torch, rng, mask):
    q, k, v = random_qkv(rng, 2, 17, 25, 4, 2, 32)
    out, lse = lookback.attention(*tensors(torch, q, k, v), return_lse=True, **mask)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == torch.float32
    expected_out, expected_lse = oracle(q, k, v, **mask)
    assert_close(out.numpy(), expected_out)
    assert_lse_close(lse.numpy(), expected_lse)


def test_transposed_tensor_and_grad_tensors(torch, rng):
    q = torch.randn(2, 4, 19, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    k = torch.randn(2, 2, 19, 16, generator=torch.Generator().manual_seed(2))
    v = torch.randn(2, 2, 19, 16, generator=torch.Generator().manual_seed(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D) views
    out = lookback.attention(qt, kt, vt)
    expected, _ = oracle(qt.detach().numpy(), kt.numpy(), vt.numpy())
    assert_close(out.numpy(), expected)


@pytest.mark.parametrize("dtype, storage", [("float16", "f16"), ("bfloat16", "bf16")])
def test_half_tensors(torch, rng, dtype, storage):
    q, k, v = random_qkv(rng, 1, 20, 20, 2, 1, 64)
    inputs = [t.to(getattr(torch, dtype)) for t in tensors(torch, q, k, v)]
    out = lookback.attention(*inputs, dtype=storage)
    assert_close(out.numpy(), oracle(q, k, v)[0], storage)
    flash = lookback.flash_attn_func(*inputs, causal=True)
    assert flash.dtype == getattr(torch, dtype)
    assert_close(flash.float().numpy(), oracle(q, k, v)[0], storage)


def torch_attention(q, k, v, is_causal):
    """Attention written in torch (1.13 has no scaled_dot_product_attention);
    is_causal is top-left aligned, as in PyTorch."""
    import torch

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if is_causal:
        future = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def test_top_left_agrees_with_torch(torch, rng):
    q, k, v = tensors(torch, *random_qkv(rng, 2, 13, 17, 4, 4, 16))
    out = lookback.attention(q, k, v, causal="top-left")
    assert_close(out.numpy(), torch_attention(q, k, v, is_causal=True).numpy())


def test_module_with_lookback_attention(torch, rng):
    """The docs' example: a hand-written causal attention replaced by lookback."""

    class SelfAttention(torch.nn.Module):
        def __init__(self, dim, heads, use_lookback):
            super().__init__()
            self.heads, self.use_lookback = heads, use_lookback
            self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)

        def forward(self, x):  # (batch, seqlen, dim)
            b, s, d = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
            if self.use_lookback:
                return lookback.attention(q, k, v).reshape(b, s, d)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (d // self.heads) ** 0.5
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
            return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, d)

    torch.manual_seed(0)
    hand = SelfAttention(64, 4, use_lookback=False)
    fast = SelfAttention(64, 4, use_lookback=True)
    fast.load_state_dict(hand.state_dict())
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        assert_close(fast(x).numpy(), hand(x).numpy())


def test_caches_and_merge_on_tensors(torch, rng):
    q, k, v = random_qkv(rng, 1, 6, 6, 2, 1, 16)
    tq, tk, tv = tensors(torch, q[0], k[0], v[0])
    cache = lookback.KVCache(8, 1, 16)
    cache.append(tk, tv)
    out, lse = cache.attend(tq, return_lse=True)
    assert isinstance(out, torch.Tensor)
    assert_close(out.numpy()[None], oracle(q, k, v)[0])
    pool = lookback.PagedKVPool(4, 4, 1, 16)
    s = pool.create()
    pool.append(s, tk, tv)
    assert isinstance(pool.attend(s, tq), torch.Tensor)
    merged, merged_lse = lookback.merge_states(out, lse, torch.zeros_like(out),
                                               torch.full_like(lse, float("-inf")))
    assert isinstance(merged, torch.Tensor)
    np.testing.assert_array_equal(merged.numpy(), out.numpy())


def test_leakcheck_with_torch_functions(torch):
    def masked(q, k, v):
        assert isinstance(q, torch.Tensor)
        return torch_attention(q, k, v, is_causal=True)

    report = lookback.leakcheck(masked, 6, 2, 2, 8, framework="torch")
    assert report.verdict == "causal"

    def unmasked(q, k, v):
        return torch_attention(q, k, v, is_causal=False)

    report = lookback.leakcheck(unmasked, 6, 2, 2, 8, framework="torch")
    assert report.leaks == [(i, j) for i in range(6) for j in range(i + 1, 6)]


def test_out_tensor(torch, rng):
    q, k, v = tensors(torch, *random_qkv(rng, 1, 9, 9, 2, 1, 16))
    out = torch.empty(1, 9, 2, 16)
    assert lookback.attention(q, k, v, out=out) is out
    assert_close(out.numpy(), oracle(q.numpy(), k.numpy(), v.numpy())[0])


def test_bfloat16_tensors_are_read_in_place_as_bf16(torch, rng):
    # Inputs already on the bf16 grid: reading them as bf16 loses nothing,
    # so f32 storage must match the reference on the same values to 1e-5.
    q, k, v = random_qkv(rng, 1, 15, 15, 4, 2, 32)
    inputs = [t.to(torch.bfloat16) for t in tensors(torch, q, k, v)]
    exact = [t.float().numpy() for t in inputs]
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs]  # (B, H, S, D) memory
    assert not strided[0].is_contiguous()
    out = lookback.attention(*strided, dtype="f32")
    assert_close(out.numpy(), oracle(*exact)[0])
    cache = lookback.KVCache(16, 2, 32)
    cache.append(inputs[1][0], inputs[2][0])
    assert_close(cache.attend(inputs[0][0]).numpy()[None], oracle(*exact)[0])
    with pytest.raises(ValueError, match="out: dtype bf16"):
        lookback.attention(*inputs, out=torch.empty(1, 15, 4, 32, dtype=torch.bfloat16))
