#!/usr/bin/env bash
# Build llama.cpp's own llama-imatrix and llama-quantize tools from the llama.cpp sources
# vendored in the llama-cpp-python release that benchmarks/setup_llamacpp.sh installs
# (the same llama.cpp, so the imatrix column of benchmarks/gguf_quant.py quantizes with
# the code that runs the files). Only the benchmark uses them; CI does not build them.
# About 10-20 minutes on 2 cores. The tools land in $TOOLS/bin.
set -euo pipefail
TOOLS=${LLAMA_TOOLS:-benchmarks/.cache/llama-tools}
VERSION=0.3.36                       # as benchmarks/setup_llamacpp.sh
mkdir -p "$TOOLS"
TOOLS=$(cd "$TOOLS" && pwd)
if [ -x "$TOOLS/bin/llama-imatrix" ] && [ -x "$TOOLS/bin/llama-quantize" ]; then
  exit 0
fi
SRC="$TOOLS/src"
if [ ! -d "$SRC/llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
  tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$LLAMA" -B "$TOOLS/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >/dev/null
cmake --build "$TOOLS/build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target llama-imatrix llama-quantize
mkdir -p "$TOOLS/bin"
cp "$TOOLS/build/bin/llama-imatrix" "$TOOLS/build/bin/llama-quantize" "$TOOLS/bin/"
