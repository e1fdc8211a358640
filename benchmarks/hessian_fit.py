"""Ablation of quant's `hessian_fit` (GPTQ on llama.cpp's grids): the blocks' scale
search weighted by H_jj against ggml's own weights from w alone, by our perplexity.

SmolLM2-135M; calibration NSAMPLES x 512 C4 train tokens (seed 0); WikiText-2 test, the
first WINDOWS windows of 512; transformers in fp32 on our effective weights (which are
llama.cpp's, bit for bit; llama.cpp's own perplexity is benchmarks/gguf_quant.py's).

    python benchmarks/hessian_fit.py --data-dir ../shared/data [--nsamples 32 --windows 32 --formats q4_0,q4_k]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune import prepare  # noqa: E402  (also puts the repository root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--formats", default="q4_0,q4_k")
    ap.add_argument("--work", default=str(HERE / ".cache" / "hessian_fit"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    _, windows, _ = prepare(a, work)
    import torch

    import compress
    from compress.eval import evaluate
    from compress.loading import load_model
    calib = torch.load(work / "calib.pt")
    lines = ["| format | hessian_fit: false ppl | hessian_fit: true ppl | seconds (false / true) |", "|---|---|---|---|"]
    for fmt in a.formats.split(","):
        ppl, secs = {}, {}
        for hf in (False, True):
            model, _ = load_model("smollm2-135m")                           # dense
            t0 = time.perf_counter()
            compress.run(model, [{"quant": {"method": "gptq", "format": f"gguf-{fmt}", "hessian_fit": hf}}],
                         calib=calib, batch_size=8)
            secs[hf] = time.perf_counter() - t0
            ppl[hf] = evaluate(model, windows, batch_size=8, desc="ppl")["ppl"]
        lines.append(f"| {fmt.upper()} | {ppl[False]:.3f} | {ppl[True]:.3f} | {secs[False]:.0f} / {secs[True]:.0f} |")
    print(f"SmolLM2-135M, GPTQ on llama.cpp's grids; calibration {a.nsamples} x {a.seqlen} C4, "
          f"WikiText-2 {windows.shape[0]} windows, our perplexity\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
