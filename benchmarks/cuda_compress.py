"""A compression run on CUDA (issue 25, step 4): SparseGPT 2:4 then GPTQ W4 g128 on a
random Llama-3-8B-shaped model cut to a few blocks, bf16, `runner.device: cuda`, with
128 x 2048 calibration tokens. Prints seconds per block, peak GPU memory, and the
32-block time projected from them beside llm-compressor's published 745 s for
Llama-3-8B GPTQ W4A16 on one GPU.

The model is built on the GPU (fast random init) and moved to the CPU, where a user's
model lives; the runner moves one block at a time to the GPU, as in any run. Random
weights and random token ids time the same work as real ones: the passes' cost does not
depend on the values.

    python benchmarks/cuda_compress.py [--blocks 4] [--json F]            # a CUDA GPU
    python benchmarks/cuda_compress.py --small --device cpu                # plumbing check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compress  # noqa: E402
import compress.runner as runner  # noqa: E402
from decode_speed import random_llama  # noqa: E402

LLMCOMPRESSOR_LLAMA3_8B_GPTQ_S = 745   # llm-compressor's published GPTQ W4A16 time, Llama-3-8B, one GPU
PASSES = [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 128, "method": "gptq"}}]


def llama3_config(blocks: int, small: bool):
    from transformers import LlamaConfig
    if small:
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=blocks, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=blocks, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def build(config, device: torch.device, dtype: torch.dtype):
    """A random LlamaForCausalLM in `dtype`, initialised on `device`, returned on the CPU."""
    return random_llama(config, device, dtype).to("cpu")


def timed_blocks(times: list):
    """Wrap the runner's per-block step so that each block's seconds land in `times`."""
    inner = runner._sweep_block

    def step(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        return out
    runner._sweep_block = step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--small", action="store_true", help="a tiny model and calibration: plumbing only")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.small:
        a.nsamples, a.seqlen = 8, 128
    dtype = torch.bfloat16
    t = time.perf_counter()
    config = llama3_config(a.blocks, a.small)
    model = build(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    print(f"built {a.blocks}-block model in {time.perf_counter() - t:.1f} s", flush=True)
    times: list = []
    timed_blocks(times)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, report = compress.run(model, PASSES, calib=ids, device=str(device), compute_dtype="bfloat16",
                             batch_size=a.batch_size)
    total = report["summary"]["seconds"]
    per_block = statistics.fmean(times)
    overhead = total - sum(times)                   # capturing the first block's inputs, once per run
    projected = 32 * per_block + overhead
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "blocks": a.blocks, "calibration": [a.nsamples, a.seqlen],
              "passes": PASSES, "seconds": total, "block_seconds": times, "per_block_s": per_block,
              "overhead_s": overhead, "projected_32_block_s": projected,
              "llmcompressor_gptq_s": LLMCOMPRESSOR_LLAMA3_8B_GPTQ_S,
              "ratio_vs_llmcompressor": projected / LLMCOMPRESSOR_LLAMA3_8B_GPTQ_S,
              "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
              "peak_rss_mib": report["summary"]["peak_rss_mib"], "layers": report["summary"]["layers"]}
    print(json.dumps(result, indent=1), flush=True)
    gib = "—" if result["peak_gpu_gib"] is None else f"{result['peak_gpu_gib']:.1f}"
    print("| blocks | s / block | peak GPU GiB | projected 32 blocks s | llm-compressor GPTQ s | ratio |\n"
          "|---|---|---|---|---|---|\n"
          f"| {a.blocks} | {per_block:.1f} | {gib} | {projected:.0f} | {LLMCOMPRESSOR_LLAMA3_8B_GPTQ_S} | "
          f"{result['ratio_vs_llmcompressor']:.2f}× |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
