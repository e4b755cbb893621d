// lookback: causal self-attention and KV caches for autoregressive models.
#pragma once

#include "lookback/attention.hpp"
#include "lookback/checkpoint.hpp"
#include "lookback/context.hpp"
#include "lookback/dtype.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/leakcheck.hpp"
#include "lookback/mask.hpp"
#include "lookback/merge.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"
#include "lookback/output_file.hpp"
#include "lookback/reference.hpp"
#include "lookback/tensor.hpp"
#include "lookback/version.hpp"
