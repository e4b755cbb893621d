# lookback: the two commands are `make demo` and `make test`.
#   make            install missing Debian packages, configure (Release), build
#   make demo       ... and run the demo
#   make test       ... and run every test through CTest
#   make test-asan  the same tests under AddressSanitizer + UBSan (build-asan/)
#   make test-tsan  the library's tests under ThreadSanitizer (build-tsan/)
#   make test-portable  the tests with dispatch capped at AVX2 and AMX off, as on
#                   an AVX2-only machine (LOOKBACK_SIMD=AVX2 LOOKBACK_DISABLE_AMX=1)
#   make fuzz       build the libFuzzer targets with clang and run each for FUZZ_SECONDS
#   make bench      lookback bench: prefill and decode against this machine's ceilings
#   make python     the Python package in the build tree (PYTHONPATH=build/python; docs/python.md)
#   make train      retrain models/kjv-tiny and its leaky twin (installs python3-torch,
#                   bible-kjv; never part of demo or test)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
# libFuzzer's seed: empty for a new one each run; CI fixes it, so that a
# submission's result does not depend on which inputs a random run happened on.
FUZZ_SEED ?=
CMAKE_FLAGS ?=

.PHONY: all deps configure build demo test test-portable test-asan test-tsan fuzz bench python clean train train-deps

all: build

deps:
	@./scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) > /dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@./scripts/demo.sh $(BUILD)/bin/lookback

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-portable: build
	@cd $(BUILD) && LOOKBACK_SIMD=AVX2 LOOKBACK_DISABLE_AMX=1 ctest --output-on-failure -j $(JOBS)

test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOKBACK_SANITIZE=ON \
	  -DLOOKBACK_BUILD_BENCH=OFF -DLOOKBACK_BUILD_EXAMPLES=OFF > /dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@cd $(ASAN_BUILD) && ctest --output-on-failure -j $(JOBS)

# The CLI, benchmarks and examples are left out: ThreadSanitizer is about the
# library's threads (the context, the kernels, the caches), which every SIMD
# target shares, so the kernels are built for this CPU's best target alone
# (CMakeLists.txt); the other targets run under ASan+UBSan.
test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOKBACK_TSAN=ON \
	  -DLOOKBACK_BUILD_TOOLS=OFF -DLOOKBACK_BUILD_BENCH=OFF -DLOOKBACK_BUILD_EXAMPLES=OFF > /dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)
	@cd $(TSAN_BUILD) && TSAN_OPTIONS=halt_on_error=1 ctest --output-on-failure -j $(JOBS)

# libFuzzer needs clang; ASan+UBSan are on. Each target runs for FUZZ_SECONDS
# on a copy of its checked-in corpus (and its regression inputs) in
# $(FUZZ_BUILD), so a run never writes into the repository; a crash, a
# sanitizer report or a mismatch leaves its input in
# $(FUZZ_BUILD)/fuzz-work/<target>/artifacts and fails the make.
FUZZ_TARGETS := fuzz_npy fuzz_attention fuzz_paged_cache fuzz_checkpoint fuzz_varlen fuzz_safetensors

fuzz: deps
	@CC=clang-14 CXX=clang++-14 cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DLOOKBACK_SANITIZE=ON -DLOOKBACK_FUZZ=ON -DLOOKBACK_BUILD_TESTS=OFF -DLOOKBACK_BUILD_TOOLS=OFF \
	  -DLOOKBACK_BUILD_BENCH=OFF -DLOOKBACK_BUILD_EXAMPLES=OFF > /dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(FUZZ_TARGETS)
	@set -e; for target in $(FUZZ_TARGETS); do \
	  work=$(FUZZ_BUILD)/fuzz-work/$$target; rm -rf $$work; mkdir -p $$work/corpus $$work/artifacts; \
	  cp fuzz/corpus/$$target/* $$work/corpus/; \
	  if [ -d fuzz/regressions/$$target ]; then cp fuzz/regressions/$$target/* $$work/corpus/; fi; \
	  dict=; if [ -f fuzz/$$target.dict ]; then dict=-dict=fuzz/$$target.dict; fi; \
	  seed=; if [ -n "$(FUZZ_SEED)" ]; then seed=-seed=$(FUZZ_SEED); fi; \
	  echo "fuzz: $$target for $(FUZZ_SECONDS) s $$seed"; \
	  $(FUZZ_BUILD)/bin/$$target $$dict $$seed -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$$work/artifacts/ $$work/corpus > $$work/log 2>&1 \
	    || { tail -n 60 $$work/log; echo "fuzz: $$target FAILED, input in $$work/artifacts/"; exit 1; }; \
	  grep -E "^stat::number_of_executed_units|^Done" $$work/log; \
	done

python: configure
	@cmake --build $(BUILD) -j $(JOBS) --target lookback_python

bench: build
	@$(BUILD)/bin/lookback bench --dtype all $(BENCH_ARGS)

# The models the demo runs: one CPU thread each, a fixed seed and step count
# (models/*/README.md record the losses and timings).
train-deps:
	@./scripts/install-deps.sh --train

train: train-deps
	OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 models/train.py --out models/kjv-tiny --lookahead 0 --steps 1200
	OMP_WAIT_POLICY=PASSIVE /usr/bin/python3 models/train.py --out models/kjv-tiny-leaky --lookahead 1 --steps 1200

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD) build-python
