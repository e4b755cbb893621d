# lookback: the two commands are `make demo` and `make test`.
#   make            install missing Debian packages, configure (Release), build
#   make demo       ... and run the demo
#   make test       ... and run every test through CTest
#   make test-asan  the same tests under AddressSanitizer + UBSan (build-asan/)
#   make test-tsan  the library's tests under ThreadSanitizer (build-tsan/)
#   make fuzz       build the libFuzzer targets with clang and run each for FUZZ_SECONDS
#   make bench      prefill and decode benchmarks (ratios to this machine's ceilings)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
CMAKE_FLAGS ?=

.PHONY: all deps configure build demo test test-asan test-tsan fuzz bench clean

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

test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOKBACK_SANITIZE=ON \
	  -DLOOKBACK_BUILD_BENCH=OFF -DLOOKBACK_BUILD_EXAMPLES=OFF > /dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@cd $(ASAN_BUILD) && ctest --output-on-failure -j $(JOBS)

# The CLI, benchmarks and examples are left out: ThreadSanitizer is about the
# library's threads (the context, the kernels, the caches).
test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOKBACK_TSAN=ON \
	  -DLOOKBACK_BUILD_TOOLS=OFF -DLOOKBACK_BUILD_BENCH=OFF -DLOOKBACK_BUILD_EXAMPLES=OFF > /dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)
	@cd $(TSAN_BUILD) && TSAN_OPTIONS=halt_on_error=1 ctest --output-on-failure -j $(JOBS)

bench: build
	@$(BUILD)/bin/prefill_bench $(BENCH_ARGS)
	@$(BUILD)/bin/decode_bench $(BENCH_ARGS)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)
