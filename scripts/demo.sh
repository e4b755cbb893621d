#!/usr/bin/env bash
# The demo `make demo` runs: what lookback is, the query-key pattern of a
# causal sequence of 7 tokens, and text from the model in models/kjv-tiny.
set -euo pipefail
LOOKBACK=${1:-build/bin/lookback}
BIN=$(dirname "$LOOKBACK")

cat <<'TEXT'
lookback: causal self-attention for autoregressive models
---------------------------------------------------------
In a causal model the output at position i may depend only on positions 0..i:
query q_i is scored against keys k_0..k_i and nothing later. lookback computes
exactly those scores (a tiled, multi-threaded SIMD kernel that skips the masked
half of the square), keeps past keys and values in a KV cache, and checks any
attention implementation for leaks from the future.

TEXT
echo "\$ lookback --version"
"$LOOKBACK" --version
echo
echo "\$ lookback pattern --len 7      # which keys each query is scored against"
"$LOOKBACK" pattern --len 7
echo
echo "\$ lookback pattern --len 7 --format matrix"
"$LOOKBACK" pattern --len 7 --format matrix
echo
echo "\$ lookback cost --len 8 --heads 32 --kv-heads 8 --dim 128   # cost per token, with and without a cache"
"$LOOKBACK" cost --len 8 --heads 32 --kv-heads 8 --dim 128
echo
echo "Serving: prefill a 2048-token prompt into a paged KV cache, then decode 256 tokens"
echo "\$ decode_demo --prompt 2048 --generate 256"
"$BIN/decode_demo" --prompt 2048 --generate 256
echo
echo "\$ lookback leakcheck      # every path of lookback, checked for leaks from the future"
"$LOOKBACK" leakcheck
echo
echo "A real model: kjv-tiny, a byte-level LLaMA-style model trained on the King James Bible"
echo "(models/kjv-tiny/README.md), generating through the paged KV cache, then again without"
echo "a cache (every token recomputes the whole prefix); each run ends with its rates."
echo "\$ lookback generate --model models/kjv-tiny --prompt \"In the beginning\" --tokens 200"
"$LOOKBACK" generate --model models/kjv-tiny --prompt "In the beginning" --tokens 200
echo "\$ lookback generate --model models/kjv-tiny --prompt \"In the beginning\" --tokens 200 --cache none > /dev/null"
"$LOOKBACK" generate --model models/kjv-tiny --prompt "In the beginning" --tokens 200 --cache none > /dev/null
echo
echo "More: lookback --help, README.md, docs/generate.md, docs/semantics.md, docs/leakage.md."
