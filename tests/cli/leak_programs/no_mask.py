"""Forgets the mask: every row reads every key, the future included. <f4."""
import numpy as np

import attention

attention.main(lambda b, h, i, j: True, dtype=np.float32)
