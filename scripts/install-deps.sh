#!/usr/bin/env bash
# Installs the Debian packages lookback needs to build, test and benchmark.
# Idempotent: when everything is present it prints nothing and touches nothing;
# `apt-get update` runs only when a package is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libhwy-dev            # Google Highway: SIMD with runtime dispatch
  libgtest-dev          # GoogleTest
  libcli11-dev          # CLI11: command-line parsing
  libfmt-dev            # fmt: formatting
  nlohmann-json3-dev    # JSON output
  libopenblas-dev       # the materialised baseline in benchmarks
  python3-numpy         # writes and reads .npy fixtures in CLI tests
  zlib1g-dev            # CRC32 of KV-cache checkpoints
  clang-14 libclang-rt-14-dev  # libFuzzer targets (make fuzz)
  python3-dev pybind11-dev python3-pybind11 python3-pytest  # the Python package and its tests
  python3-venv python3-pip python3-setuptools  # pip install . into a venv, offline
  libopenmpi-dev openmpi-bin   # lookback::lookback_mpi and mpirun (ring prefill, sharded decode)
  libsentencepiece-dev  # tokenizer.model of models run by lookback generate
)
# --train: what `make train` needs to retrain models/kjv-tiny (never demo or test).
if [ "${1:-}" = "--train" ]; then
  packages=(python3-torch python3-numpy bible-kjv bible-kjv-text)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
