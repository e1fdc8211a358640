#!/usr/bin/env bash
# Build llama-cpp-python from source (PyPI has no CPU wheel for this platform; the
# project's own wheel index cannot be reached here) into the current environment, so
# that benchmarks/export.py can compare llama.cpp's perplexity on our GGUF files.
# About 10-30 minutes on 2 cores. A built wheel is kept in $WHEELS for reuse.
set -euo pipefail
WHEELS=${WHEELS:-benchmarks/.cache/wheels}
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
    python3 -m pip wheel --no-deps "llama-cpp-python==0.3.36" -w "$WHEELS"
fi
python3 -m pip install "$WHEELS"/llama_cpp_python-*.whl diskcache jinja2
