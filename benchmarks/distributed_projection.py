"""On paper: the wall time of a distributed GPTQ run on 1, 4 and 8 GPUs, projected from
the per-block work and traffic of compress.dist / compress.parallel.

Per block, with P processes, T calibration tokens and a GPU that multiplies at R (bf16,
the calibration forwards and X^T X) and R32 (fp32, the passes' math):

    forward  = (2 forwards x 2 * params * T  +  2 * T * sum_inputs d_in^2) / (P * R)
               (the statistics forward and the propagation, each rank on T / P tokens)
    solve    = the largest rank's share (compress.dist.assign over PassConfig.cost:
               d_in^3 / 3 + out * d_in^2 multiply-adds, plus 10 * 80 elementwise
               operations per weight for the MSE clip search) * 2 / R32
               + columns * LATENCY (the column loop is a chain of small kernels)
    traffic  = (P - 1) * (X^T X bytes + weight bytes) / B
               (every rank receives the other ranks' X^T X, fp32, and the weights it
               did not compute: fp32, the dense form of a packed result, an upper bound)

The X^T X and weight bytes are what benchmarks/distributed.py measures on SmolLM2 (its
"reduced" and "broadcast" columns follow these formulas: 12.85 MiB of X^T X per block).
The model shapes are the published configs. MoE experts run in moe_calibration "all"
(every expert on every token, as llm-compressor's default).

    python benchmarks/distributed_projection.py [--tokens 65536] [--tflops 400] [--tflops32 40]
        [--gbps 150] [--latency-us 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import dist  # noqa: E402
from compress.passes.quant import QuantConfig  # noqa: E402

# [(name, out, d_in, count)] per block: count experts share one shape (and one input).
MODELS = {
    "Llama-3-8B": {"blocks": 32, "layers": [("q", 4096, 4096, 1), ("k", 1024, 4096, 1), ("v", 1024, 4096, 1),
                                            ("o", 4096, 4096, 1), ("gate", 14336, 4096, 1), ("up", 14336, 4096, 1),
                                            ("down", 4096, 14336, 1)],
                   "inputs": [(4096, 1), (4096, 1), (4096, 1), (14336, 1)], "peer": "745 s on 1 GPU, 264 s on 4"},
    "Qwen3-30B-A3B (128 experts)": {
        "blocks": 48, "layers": [("q", 4096, 2048, 1), ("k", 512, 2048, 1), ("v", 512, 2048, 1), ("o", 2048, 4096, 1),
                                 ("gate", 768, 2048, 128), ("up", 768, 2048, 128), ("down", 2048, 768, 128)],
        "inputs": [(2048, 1), (4096, 1), (2048, 1), (768, 128)], "peer": "14,207 s on 1 GPU, 3,694 s on 4"},
}


def block_time(m: dict, procs: int, a) -> tuple[float, float, float]:
    """(forward, solve, traffic) seconds of one block on `procs` GPUs."""
    gptq = QuantConfig(bits=4, group_size=128)
    params = sum(out * d * n for _, out, d, n in m["layers"])
    xtx = sum(d * d * n for d, n in m["inputs"])
    forward = (2 * 2 * params * a.tokens + 2 * a.tokens * xtx) / (procs * a.tflops * 1e12)
    units = {(name, e): gptq.cost(out, d) for name, out, d, n in m["layers"] for e in range(n)}
    owner = dist.assign(units, procs)
    width = {name: d for name, _, d, _ in m["layers"]}
    load, loops = [0.0] * procs, [set() for _ in range(procs)]
    for (name, e), r in owner.items():
        load[r] += units[(name, e)]
        loops[r].add(name)   # a rank's experts of one projection run as one batched column loop
    solve = max(2 * load[r] / (a.tflops32 * 1e12) + sum(width[n] for n in loops[r]) * a.latency_us * 1e-6
                for r in range(procs))
    traffic = (procs - 1) * 4 * (xtx + params) / (a.gbps * 1e9)
    return forward, solve, traffic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128 * 512, help="calibration tokens (the engine protocol)")
    ap.add_argument("--tflops", type=float, default=400, help="bf16 matmul rate reached, TFLOP/s (H100 peak 989)")
    ap.add_argument("--tflops32", type=float, default=40, help="fp32 rate of the passes' math, TFLOP/s (H100 peak 67)")
    ap.add_argument("--gbps", type=float, default=150, help="all-gather / broadcast bandwidth per GPU, GB/s (NVLink)")
    ap.add_argument("--latency-us", type=float, default=30, help="column-loop time per column, microseconds")
    a = ap.parse_args()
    print(f"{a.tokens} calibration tokens, {a.tflops:g} TFLOP/s bf16, {a.tflops32:g} TFLOP/s fp32, {a.gbps:g} GB/s, "
          f"{a.latency_us:g} us per column; GPTQ W4 g128 with MSE clipping\n")
    print("| model | GPUs | forward s | solve s | traffic s | total s | speed-up | llm-compressor (published) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        base = None
        for p in (1, 4, 8):
            f, s, t = (m["blocks"] * x for x in block_time(m, p, a))
            base = base or f + s + t
            print(f"| {name} | {p} | {f:.1f} | {s:.1f} | {t:.1f} | {f + s + t:.1f} | {base / (f + s + t):.2f}x | "
                  f"{m['peer'] if p == 1 else ''} |")


if __name__ == "__main__":
    main()
