"""Causal everywhere except in the last head of the last batch element, where
row 2 also reads key 5: a leak no other head or batch element shows."""
import sys

import numpy as np

import attention

batch, _, heads, _ = np.load(sys.argv[1], mmap_mode="r").shape
attention.main(lambda b, h, i, j: j <= i or (b == batch - 1 and h == heads - 1 and (i, j) == (2, 5)))
