#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_attention and fuzz_paged_cache.

Each seed is built field by field in the order the harness reads them with
libFuzzer's FuzzedDataProvider, which takes integers from the END of the
input (most significant byte last in the file) and raw bytes from the front.
If a harness changes its decoding, the old seeds still are valid inputs, they
just decode to other cases: rerun this script (python3 fuzz/make_seeds.py)
and check the cases with LOOKBACK_FUZZ_PRINT=1 build-fuzz/bin/<target> FILE.
fuzz_npy's seeds are real .npy files (tests/fixtures plus malformed ones).
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


class Encoder:
    """The inverse of FuzzedDataProvider for the calls the harnesses make."""

    def __init__(self):
        self.tail = bytearray()  # integers, in consumption order
        self.front = b""

    def int_in_range(self, value, low, high):
        assert low <= value <= high, (value, low, high)
        span, offset, width = high - low, 0, 0
        while offset < 64 and (span >> offset) > 0:
            offset += 8
            width += 1
        # Read back as result = (result << 8) | byte, first byte most significant.
        self.tail += (value - low).to_bytes(width, "big") if width else b""

    def boolean(self, value):
        self.int_in_range(1 if value else 0, 0, 255)

    def u64(self, value):
        self.int_in_range(value, 0, 2**64 - 1)

    def u32(self, value):
        self.int_in_range(value, 0, 2**32 - 1)

    def remaining(self, data):
        self.front = bytes(data)

    def bytes(self):
        return self.front + bytes(reversed(self.tail))


MODES = {"prefill": 0, "decode": 1, "chunked": 2, "paged": 3, "split": 4}
SIMD_TARGETS = 4  # AVX3, AVX2, SSE4, EMU128 on the machine that wrote them; any count >= 2 reads one byte


def attention_seed(batch=1, seqlen_q=7, seqlen_k=7, heads=1, kv_heads=1, head_dim=8,
                   causal="bottom-right", window=None, scale=None, softcap=None, alibi=None,
                   mode="prefill", chunk=1, block_size=16, splits=2, threads=1, storage="f32",
                   input_dtype="f32", strided=False, lse=True, hostile=0, simd=0,
                   values=None, seed=1, magnitude=0):
    e = Encoder()
    e.int_in_range({1: 0, 2: 1, 0: 15}[batch], 0, 15)
    e.int_in_range(seqlen_q, 0, 40)
    e.int_in_range(seqlen_k, 0, 40)
    e.int_in_range(heads, 1, 4)
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    if kv_heads in divisors:
        e.int_in_range(0, 0, 3)
        e.int_in_range(divisors.index(kv_heads), 0, len(divisors) - 1)
    else:
        e.int_in_range(3, 0, 3)
        e.int_in_range(kv_heads, 0, 4)
    odd_dims = [0, 256, 257, 300, -1, 128, 48, 80]
    e.int_in_range(head_dim - 1 if 1 <= head_dim <= 40 else 56 + odd_dims.index(head_dim), 0, 63)
    e.int_in_range({"bottom-right": 0, "top-left": 6, "none": 7}[causal], 0, 7)
    if window is None:
        e.int_in_range(0, 0, 7)
    else:
        e.int_in_range(5, 0, 7)
        e.int_in_range(window, -2, 44)
    if scale is None:  # default 1/sqrt(head_dim)
        e.int_in_range(0, 0, 7)
    elif isinstance(scale, tuple):  # ("large", k): scale = 10^k / sqrt(head_dim), k in 4..10
        e.int_in_range(4, 0, 7)
        e.int_in_range(scale[1], 4, 10)
    elif isinstance(scale, str):  # "inf", "-inf", "nan", "zero"
        e.int_in_range(7, 0, 7)
        e.int_in_range(["inf", "-inf", "nan", "zero"].index(scale), 0, 3)
    else:  # scale = factor / 32 / sqrt(head_dim)
        e.int_in_range(5, 0, 7)
        e.int_in_range(scale, -48, 48)
    if softcap is None:
        e.int_in_range(0, 0, 7)
    elif isinstance(softcap, str):  # "negative", "nan", "inf", "-0"
        e.int_in_range(7, 0, 7)
        e.int_in_range(["negative", "nan", "inf", "-0"].index(softcap), 0, 3)
    else:  # softcap = value / 8
        e.int_in_range(5, 0, 7)
        e.int_in_range(softcap, 1, 400)
    if alibi is None:
        e.int_in_range(0, 0, 3)
    else:  # slopes = value / 128 per head; alibi = (slopes, bad_index or None)
        slopes, bad = alibi
        e.int_in_range(3, 0, 3)
        for slope in slopes:
            e.int_in_range(slope, -16, 64)
        if bad is None:
            e.int_in_range(0, 0, 15)
        else:
            e.int_in_range(15, 0, 15)
            e.int_in_range(bad, 0, heads - 1)
            e.boolean(True)  # NaN
    e.int_in_range(MODES[mode], 0, 4)
    e.int_in_range((chunk - 1) % 11, 0, 10)
    e.int_in_range((block_size - 1) % 21, 0, 20)
    e.int_in_range((splits - 1) % 11, 0, 10)
    e.int_in_range(threads, 1, 3)
    e.int_in_range({"f32": 0, "bf16": 10, "f16": 13, "f64": 15}[storage], 0, 15)
    e.int_in_range({"f32": 0, "f16": 5, "bf16": 6, "f64": 7}[input_dtype], 0, 7)
    e.boolean(strided)
    e.boolean(not lse)
    e.int_in_range(hostile, 0, 63)
    e.int_in_range(simd, 0, SIMD_TARGETS - 1)
    e.int_in_range(3 if values is not None else 0, 0, 3)
    e.u64(seed)
    e.int_in_range(magnitude, 0, 3)
    if values is not None:  # each byte: int8 / 128
        e.remaining(bytes(v & 0xFF for v in values))
    return e.bytes()


def paged_seed(ops, block_size=4, num_blocks=6, kv_heads=1, group=1, head_dim=8, storage=0,
               rope=None, window=None, softcap=None, scale=None, alibi=None, splits=0, threads=1,
               seed=1):
    """ops: ("create",), ("fork", index), ("release", index), ("append", index, n),
    ("exhaust", index, n), ("attend", [(index, tokens), ...]), ("shuffle", seed);
    index is a position in the harness's sorted live ids, or None for an
    unknown id. tokens = 0 and length + 1 are the invalid picks."""
    e = Encoder()
    e.int_in_range(block_size, 1, 8)
    e.int_in_range(num_blocks, 0, 12)
    e.int_in_range(kv_heads, 1, 2)
    e.int_in_range(group, 1, 2)
    e.int_in_range(head_dim, 1, 24)
    e.int_in_range(storage, 0, 3)  # 0, 1: f32; 2: bf16; 3: f16
    if rope is None:
        e.int_in_range(0, 0, 3)
    else:  # (theta_100, interleaved)
        e.int_in_range(3, 0, 3)
        e.boolean(rope[0])
        e.boolean(rope[1])
    for value, low, high in ((window, 0, 12), (softcap, 1, 80), (scale, -32, 32)):
        if value is None:
            e.int_in_range(0, 0, 3)
        else:
            e.int_in_range(3, 0, 3)
            e.int_in_range(value, low, high)
    if alibi is None:
        e.int_in_range(0, 0, 3)
    else:
        e.int_in_range(3, 0, 3)
        for slope in alibi:
            e.int_in_range(slope, 0, 64)
    e.int_in_range(splits, 0, 5)
    e.int_in_range(threads, 1, 3)
    e.u64(seed)

    # A model of the live sequences (sorted ids, lengths, blocks) so that each
    # pick is encoded in the range the harness will read it with.
    live = {}  # id -> (length, [logical blocks])
    next_id, next_block = 0, 0

    def used():
        return len({b for _, blocks in live.values() for b in blocks})

    def pick(index):
        if not live:
            return None
        if index is None:
            e.int_in_range(15, 0, 15)
            return None
        e.int_in_range(0, 0, 15)
        e.int_in_range(index, 0, len(live) - 1)
        return sorted(live)[index]

    def append(sid, n):
        nonlocal next_block
        if sid is None:
            return
        length, blocks = live[sid]
        shared = length % block_size != 0 and any(
            blocks[-1] in other for i, (_, other) in live.items() if i != sid)
        new = (length + n + block_size - 1) // block_size - len(blocks)
        if new + shared > num_blocks - used():
            return  # kCapacity: nothing changes
        blocks = list(blocks)
        if shared:
            blocks[-1] = next_block
            next_block += 1
        for _ in range(new):
            blocks.append(next_block)
            next_block += 1
        live[sid] = (length + n, blocks)

    for op in ops:
        kind = op[0]
        if kind == "create":
            e.int_in_range(0, 0, 9)
            live[next_id] = (0, [])
            next_id += 1
        elif kind == "fork":
            e.int_in_range(1, 0, 9)
            parent = pick(op[1])
            if parent is not None:
                live[next_id] = live[parent]
                next_id += 1
        elif kind == "release":
            e.int_in_range(2, 0, 9)
            sid = pick(op[1])
            if sid is not None:
                del live[sid]
        elif kind == "append":
            e.int_in_range(3, 0, 9)
            sid = pick(op[1])
            e.int_in_range(op[2], 1, block_size + 4)
            append(sid, op[2])
        elif kind == "exhaust":
            e.int_in_range(6, 0, 9)
            sid = pick(op[1])
            e.int_in_range(op[2], 1, 100)
            append(sid, op[2])
        elif kind == "attend":
            e.int_in_range(7, 0, 9)
            e.int_in_range(len(op[1]), 1, 4)
            for index, tokens in op[1]:
                sid = pick(index)
                length = 1 if sid is None else live[sid][0]
                if tokens == 0:
                    e.int_in_range(14, 0, 15)
                elif tokens == length + 1 and sid is not None:
                    e.int_in_range(15, 0, 15)
                else:
                    e.int_in_range(0, 0, 15)
                    e.int_in_range(tokens - 1, 0, max(length - 1, 0))
        elif kind == "shuffle":
            e.int_in_range(9, 0, 9)
            e.u32(op[1])
        else:
            raise ValueError(kind)
    return e.bytes()


def attention_seeds():
    return {
        "prefill_square": attention_seed(),
        "decode_gqa": attention_seed(mode="decode", heads=4, kv_heads=2, seqlen_q=5, seqlen_k=12, head_dim=16),
        "chunked_window": attention_seed(mode="chunked", chunk=3, seqlen_q=9, seqlen_k=20, window=4, head_dim=24),
        "paged_odd_block": attention_seed(mode="paged", block_size=3, chunk=2, seqlen_q=7, seqlen_k=19, heads=2, threads=2),
        "split_more_parts_than_keys": attention_seed(mode="split", splits=10, seqlen_q=4, seqlen_k=3, head_dim=5),
        "split_alibi_softcap": attention_seed(mode="split", splits=3, seqlen_q=12, seqlen_k=30, alibi=([16, 8, 4], None),
                                              heads=3, kv_heads=1, softcap=40, threads=3),
        "top_left_empty_rows": attention_seed(causal="top-left", seqlen_q=9, seqlen_k=4, window=1, head_dim=33),
        "bottom_right_empty_rows": attention_seed(seqlen_q=12, seqlen_k=5, mode="split", splits=2),
        "bidirectional": attention_seed(causal="none", seqlen_q=6, seqlen_k=11, head_dim=40, batch=2),
        "bf16_storage": attention_seed(storage="bf16", seqlen_q=16, seqlen_k=16, head_dim=32, heads=2, kv_heads=1),
        "f16_storage_f64_input": attention_seed(storage="f16", input_dtype="f64", seqlen_q=3, seqlen_k=8, mode="chunked", chunk=2),
        "strided_no_lse": attention_seed(strided=True, lse=False, batch=2, heads=2, kv_heads=2, seqlen_q=5, seqlen_k=9),
        "emu128_target": attention_seed(simd=3, seqlen_q=5, seqlen_k=5, head_dim=17),
        "byte_values_ties": attention_seed(seqlen_q=3, seqlen_k=3, head_dim=2, values=[64, -64] * 24),
        "custom_scale": attention_seed(scale=48, seqlen_q=8, seqlen_k=8, head_dim=12),
        "zero_scale_bf16": attention_seed(scale="zero", storage="bf16", seqlen_q=1, seqlen_k=1, head_dim=1),
        "large_scores_1e8_split": attention_seed(scale=("large", 8), mode="split", splits=3, seqlen_q=20,
                                                 seqlen_k=37, head_dim=24),
        "large_scores_1e10_bf16": attention_seed(scale=("large", 10), storage="bf16", seqlen_q=30,
                                                 seqlen_k=40, head_dim=128, heads=2, kv_heads=1),
        "large_scores_1e9_paged_f16": attention_seed(scale=("large", 9), storage="f16", mode="paged",
                                                     chunk=3, block_size=4, seqlen_q=9, seqlen_k=30),
        "head_dim_256": attention_seed(head_dim=256, seqlen_q=2, seqlen_k=3),
        # Invalid: each must be rejected with lookback::Error.
        "invalid_kv_heads": attention_seed(heads=3, kv_heads=2),
        "invalid_head_dim_300": attention_seed(head_dim=300),
        "invalid_cache_top_left": attention_seed(mode="decode", causal="top-left"),
        "invalid_cache_more_queries": attention_seed(mode="paged", seqlen_q=8, seqlen_k=4),
        "invalid_negative_window": attention_seed(window=-1),
        "invalid_window_bidirectional": attention_seed(causal="none", window=3),
        "invalid_nan_softcap": attention_seed(softcap="nan"),
        "invalid_nan_slope": attention_seed(heads=2, alibi=([8, 8], 1)),
        "invalid_zero_splits": attention_seed(mode="split", splits=0),
        "invalid_f64_storage": attention_seed(storage="f64"),
        "invalid_lse_shape": attention_seed(hostile=3),
        "empty_batch": attention_seed(batch=0),
    }


def paged_seeds():
    return {
        "fork_copy_on_write": paged_seed([
            ("create",), ("append", 0, 6), ("fork", 0), ("append", 1, 1), ("append", 0, 2),
            ("attend", [(0, 3), (1, 7)]), ("release", 0), ("attend", [(0, 2)])]),
        "exhaust_then_attend": paged_seed([
            ("create",), ("append", 0, 5), ("exhaust", 0, 60), ("attend", [(0, 5)]),
            ("append", 0, 3), ("attend", [(0, 1)])], num_blocks=3, block_size=3),
        "shuffle_and_batch": paged_seed([
            ("create",), ("create",), ("append", 0, 7), ("append", 1, 4), ("shuffle", 1234),
            ("attend", [(0, 2), (1, 4), (0, 7)]), ("shuffle", 99), ("append", 1, 4),
            ("attend", [(1, 8)])], kv_heads=2, group=2, head_dim=12, threads=2, splits=3),
        "empty_pool": paged_seed([
            ("create",), ("append", 0, 1), ("fork", 0), ("attend", [(0, 1)]), ("release", 1)],
            num_blocks=0),
        "unknown_ids_and_bad_tokens": paged_seed([
            ("create",), ("append", 0, 2), ("release", None), ("fork", None),
            ("attend", [(0, 0)]), ("attend", [(0, 3)]), ("attend", [(None, 1)])]),
        "rope_window_alibi_bf16": paged_seed([
            ("create",), ("append", 0, 8), ("fork", 0), ("append", 0, 3), ("append", 1, 5),
            ("attend", [(0, 4), (1, 2)])], storage=2, rope=(False, False), window=3,
            alibi=[32, 8], group=2, head_dim=10),
        "block_size_one_f16_softcap": paged_seed([
            ("create",), ("append", 0, 5), ("fork", 0), ("fork", 1), ("append", 2, 3),
            ("release", 0), ("attend", [(0, 5), (1, 8)])], block_size=1, num_blocks=12,
            storage=3, softcap=20, rope=(True, True), head_dim=7),
        "fork_of_partial_block_exhausts": paged_seed([
            ("create",), ("append", 0, 3), ("fork", 0), ("fork", 0), ("append", 1, 1),
            ("append", 2, 1), ("append", 0, 1), ("attend", [(0, 4), (1, 4), (2, 4)])],
            block_size=4, num_blocks=3, scale=24),
    }


def write(folder, seeds):
    os.makedirs(folder, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write(os.path.join(HERE, "corpus", "fuzz_attention"), attention_seeds())
    write(os.path.join(HERE, "corpus", "fuzz_paged_cache"), paged_seeds())
