"""What the Python binding adds to an attention call (docs/python.md).

Times lookback.attention on NumPy arrays against the same library's C API
(lookback_attend, called through ctypes on the liblookback the extension
loaded) on the same inputs, alternating them, and prints the medians and
their ratios. The C call writes into a preallocated output; Python runs
twice: allocating its result (a new array each call, whose pages the kernel
touches for the first time) and writing into a preallocated one (out=).

    PYTHONPATH=build/python /usr/bin/python3 bench/python_overhead.py [--shape B S H D] [--reps N]
"""

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import numpy as np

import lookback
from lookback import _lookback


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("shape", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4)]


class Params(ctypes.Structure):
    _fields_ = [("q", Tensor), ("k", Tensor), ("v", Tensor),
                ("out", ctypes.c_void_p), ("maybe_lse", ctypes.c_void_p),
                ("maybe_alibi_slopes", ctypes.c_void_p), ("has_scale", ctypes.c_int),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("causal", ctypes.c_int),
                ("window_left", ctypes.c_int64), ("storage", ctypes.c_int)]


def loaded_library():
    """The liblookback the extension module linked, from this process's maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/liblookback.so" in path:
            return ctypes.CDLL(path)
    raise SystemExit("liblookback is not loaded")


def tensor(array):
    t = Tensor(array.ctypes.data, 0)  # LOOKBACK_F32, strides 0: contiguous
    t.shape[:] = array.shape
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 4096, 32, 128],
                        metavar=("B", "S", "H", "D"))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(args.shape, dtype=np.float32) for _ in range(3))
    lookback.attention(q, k, v)  # loads the library, warms the context pool

    library = loaded_library()
    library.lookback_last_error.restype = ctypes.c_char_p
    context = ctypes.c_void_p()
    assert library.lookback_context_create(0, ctypes.byref(context)) == 0
    out = np.empty_like(q)
    params = Params(tensor(q), tensor(k), tensor(v), out.ctypes.data, None, None, 0, 0.0, 0.0,
                    0, -1, 0)

    def c_call():
        status = library.lookback_attend(context, ctypes.byref(params))
        if status != 0:
            raise SystemExit(library.lookback_last_error().decode())

    c_call()
    python_out = np.empty_like(q)
    calls = {
        "C API (lookback_attend)": c_call,
        "Python lookback.attention": lambda: lookback.attention(q, k, v),
        "Python attention(out=...)": lambda: lookback.attention(q, k, v, out=python_out),
    }
    times = {name: [] for name in calls}
    for _ in range(args.reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    np.testing.assert_array_equal(python_out, out)
    library.lookback_context_destroy(context)

    print(f"shape {tuple(args.shape)} float32, bottom-right causal, {args.reps} alternating reps; "
          f"{lookback.kernel_info()['description']}")
    c_median = statistics.median(times["C API (lookback_attend)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:27s} median {median * 1e3:9.2f} ms  ratio to C {median / c_median:.3f}")


if __name__ == "__main__":
    main()
