"""NaN in every output: no row changes (NaN stays NaN), so only the NaN
itself can tell that nothing was checked."""
import sys

import numpy as np

q = np.load(sys.argv[1])
np.save(sys.argv[4], np.full(q.shape, np.nan))
