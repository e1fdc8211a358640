"""Batched against looped: SparseGPT and GPTQ on the experts of one MoE projection.

The experts of a fused projection run as one batched layer (compress/batch.py): one
Cholesky call and one column loop over W [E, out, in]. The reference is the same pass
once per expert (COMPRESS_MOE_LOOP=1 does the same inside a whole run). Both see the
same weights (an upcycled SmolLM2 block's experts when benchmarks/moe.py has built it,
else random ones of its shapes) and the same statistics, from Gaussian inputs with
per-channel scales (only the shapes matter for the time). Each timing is the best of
--repeats runs; the results are checked equal.

    python benchmarks/moe_batched.py [--experts 8] [--tokens 2048] [--repeats 3] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress.batch import ExpertLayer, run_on_experts  # noqa: E402
from compress.passes.base import make_config  # noqa: E402
from compress.stats import ExpertStats  # noqa: E402

PASSES = {"SparseGPT 50 %": ("sparsegpt", {"sparsity": 0.5}), "SparseGPT 2:4": ("sparsegpt", {"pattern": "2:4"}),
          "GPTQ W4 g64": ("quant", {"bits": 4, "group_size": 64})}


def weights(E: int) -> dict:
    """{projection: W [E, out, in]}: block 0's experts of the upcycled model, or random."""
    f = HERE / ".cache" / "moe" / "upcycled" / "model.safetensors"
    shapes = {"gate_proj": (1536, 576), "down_proj": (576, 1536)}
    if f.is_file():
        from safetensors import safe_open
        with safe_open(str(f), framework="pt") as st:
            keys = {p: [k for k in st.keys() if ".layers.0." in k and f".{w}." in k]
                    for p, w in (("gate_proj", "w1"), ("down_proj", "w2"))}
            if all(len(v) >= E for v in keys.values()):
                return {p: torch.stack([st.get_tensor(k).float() for k in sorted(v)[:E]]) for p, v in keys.items()}
    g = torch.Generator().manual_seed(0)
    return {p: torch.randn(E, *s, generator=g) * 0.02 for p, s in shapes.items()}


def stats(E: int, d_in: int, tokens: int) -> ExpertStats:
    g = torch.Generator().manual_seed(1)
    st = ExpertStats(E, d_in, True, "cpu")
    X = torch.randn(E, tokens, d_in, generator=g) * torch.rand(E, 1, d_in, generator=g).add(0.1)
    st.update(torch.arange(E), X, torch.full((E,), tokens))
    return st


def timed(W: torch.Tensor, st: ExpertStats, cfg, loop: bool, repeats: int) -> tuple[float, torch.Tensor]:
    import os
    os.environ["COMPRESS_MOE_LOOP"] = "1" if loop else "0"
    best, out = float("inf"), None
    for _ in range(repeats):
        layer = ExpertLayer("experts.p", W.clone(), W.clone(), st, names=[f"experts.{e}.p" for e in range(len(W))])
        t0 = time.perf_counter()
        run_on_experts(layer, cfg, min_tokens=0)
        best, out = min(best, time.perf_counter() - t0), layer.W
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown")
    a = ap.parse_args()
    Ws = weights(a.experts)
    lines = [f"{a.experts} experts, {torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| pass | projection [E, out, in] | batched s | looped s | speed-up | max abs diff |", "|---|---|---|---|---|---|"]
    for label, (name, args) in PASSES.items():
        cfg = make_config(name, args)
        for proj, W in Ws.items():
            st = stats(a.experts, W.shape[-1], a.tokens)
            tb, wb = timed(W, st, cfg, False, a.repeats)
            tl, wl = timed(W, st, cfg, True, a.repeats)
            lines.append(f"| {label} | {proj} {list(W.shape)} | {tb:.2f} | {tl:.2f} | {tl / tb:.2f}× | "
                         f"{float((wb - wl).abs().max()):.1e} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
