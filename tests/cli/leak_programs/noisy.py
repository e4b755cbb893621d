"""A correct causal attention whose every output carries 1e-6 relative noise
that changes from run to run, as a nondeterministic reduction order would:
causal, but not deterministic."""
import sys

import numpy as np

import attention

q, k, v = (np.load(path) for path in sys.argv[1:4])
out = attention.attend(q, k, v, lambda b, h, i, j: j <= i)
noise = np.random.default_rng().uniform(-1e-6, 1e-6, out.shape)
np.save(sys.argv[4], out * (1 + noise))
