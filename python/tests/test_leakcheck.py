"""lookback.leakcheck finds exactly the leaks planted in Python functions."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lookback

LENGTH, HEADS, KV_HEADS, DIM = 8, 4, 2, 16


def numpy_attention(q, k, v, allowed):
    """Plain attention; allowed(i, j, head) says which keys a row may read."""
    group = q.shape[2] // k.shape[2]
    out = np.zeros_like(q)
    for h in range(q.shape[2]):
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        scores = np.einsum("bqd,bkd->bqk", q[:, :, h], kh) / np.sqrt(q.shape[-1])
        n = q.shape[1]
        mask = np.array([[allowed(i, j, h) for j in range(n)] for i in range(n)])
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), vh)
    return out


def causal(q, k, v):
    return numpy_attention(q, k, v, lambda i, j, h: j <= i)


def no_mask(q, k, v):
    return numpy_attention(q, k, v, lambda i, j, h: True)


def off_by_one(q, k, v):
    return numpy_attention(q, k, v, lambda i, j, h: j <= i + 1)


def one_head_leaks(q, k, v):
    return numpy_attention(q, k, v, lambda i, j, h: j <= i or h == 2)


def check(fn, **kwargs):
    return lookback.leakcheck(fn, LENGTH, HEADS, KV_HEADS, DIM, **kwargs)


def future_pairs(n):
    return [(i, j) for i in range(n) for j in range(n) if j > i]


def test_correct_function_is_causal():
    report = check(causal, batch=2)
    assert report.verdict == "causal" and report.leaks == [] and report.missing == []
    np.testing.assert_array_equal(report.dependency, lookback.visible_mask(LENGTH))
    assert report.runs == LENGTH + 2


def test_no_mask_leaks_every_future_pair():
    report = check(no_mask)
    assert report.verdict == "leak" and report.leaks == future_pairs(LENGTH)


def test_off_by_one_leaks_the_next_token():
    report = check(off_by_one)
    assert report.leaks == [(i, i + 1) for i in range(LENGTH - 1)]


def test_one_head_leak_is_found_in_that_head_only():
    report = check(one_head_leaks, batch=2)
    assert report.leaks == future_pairs(LENGTH)
    per_head = report.per_batch_head.any(axis=0)  # (heads, length, length)
    future = ~lookback.visible_mask(LENGTH)
    assert [bool((per_head[h] & future).any()) for h in range(HEADS)] == [False, False, True, False]


def test_window_mask_and_missing_pairs():
    windowed = lambda q, k, v: numpy_attention(q, k, v, lambda i, j, h: i - 2 <= j <= i)  # noqa: E731
    assert check(windowed, window=2).verdict == "causal"
    report = check(causal, window=2)  # reads further back than the window allows
    assert report.leaks == [(i, j) for i in range(LENGTH) for j in range(i - 2)]
    report = check(windowed)  # the full causal mask: older keys are missing
    assert report.verdict == "causal"
    assert report.missing == [(i, j) for i in range(LENGTH) for j in range(i - 2)]


def test_lookback_itself_is_causal_and_leaks_without_a_mask():
    assert check(lambda q, k, v: lookback.attention(q, k, v)).verdict == "causal"
    report = check(lambda q, k, v: lookback.attention(q, k, v, causal="none"))
    assert report.leaks == future_pairs(LENGTH)


class Planted(Exception):
    pass


def test_exceptions_of_fn_propagate_with_their_traceback():
    def broken(q, k, v):
        raise Planted("from inside fn")

    with pytest.raises(Planted, match="from inside fn") as info:
        check(broken)
    assert any(entry.name == "broken" for entry in info.traceback)


def test_wrong_output_shape_is_a_value_error():
    with pytest.raises(ValueError, match="shape"):
        check(lambda q, k, v: q[:, :, :2])


def test_non_array_output_is_a_value_or_type_error():
    with pytest.raises((TypeError, ValueError)):
        check(lambda q, k, v: "not an array")


def test_nan_output_is_a_value_error():
    with pytest.raises(ValueError, match="NaN"):
        check(lambda q, k, v: np.full_like(q, np.nan))


# ---- the same report as `lookback leakcheck --exec` ---------------------------

PROGRAMS = Path(__file__).resolve().parents[2] / "tests" / "cli" / "leak_programs"
RULES = {  # each program of tests/cli/leak_programs and its rule
    "causal.py": lambda b, h, i, j: j <= i,
    "no_mask.py": lambda b, h, i, j: True,
    "off_by_one.py": lambda b, h, i, j: j <= i + 1,
    "one_head_leak.py": lambda b, h, i, j: j <= i or (b == 1 and h == HEADS - 1 and (i, j) == (2, 5)),
}


@pytest.mark.parametrize("program", sorted(RULES))
def test_same_report_as_the_cli(program, monkeypatch):
    binary = os.environ.get("LOOKBACK_BIN")
    if not binary:
        pytest.skip("LOOKBACK_BIN (the lookback CLI) is not set; ctest sets it")
    command = f"{sys.executable} {PROGRAMS / program} {{q}} {{k}} {{v}} {{out}}"
    completed = subprocess.run(
        [binary, "leakcheck", "--exec", command, "--len", str(LENGTH), "--heads", str(HEADS),
         "--kv-heads", str(KV_HEADS), "--dim", str(DIM), "--batch", "2", "--format", "json"],
        capture_output=True, text=True)
    assert completed.returncode in (0, 1), completed.stderr
    cli = json.loads(completed.stdout)
    monkeypatch.syspath_prepend(str(PROGRAMS))
    attention = importlib.import_module("attention")
    rule = RULES[program]
    report = lookback.leakcheck(lambda q, k, v: attention.attend(q, k, v, rule),
                                LENGTH, HEADS, KV_HEADS, DIM, batch=2)
    assert report.verdict == cli["verdict"]
    assert report.leaks == [tuple(p) for p in cli["leaks"]]
    assert report.missing == [tuple(p) for p in cli["missing"]]
    np.testing.assert_array_equal(report.dependency, np.array(cli["dependency"], dtype=bool))
