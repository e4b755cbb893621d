"""Writes O as <i4, a dtype leakcheck does not read."""
import sys

import numpy as np

q = np.load(sys.argv[1])
np.save(sys.argv[4], np.zeros(q.shape, dtype="<i4"))
