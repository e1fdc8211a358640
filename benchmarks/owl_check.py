"""Where our OWL and llm-compressor's part (issue 23): our pruning pass run with OWL's
allocation taken two other ways, on SmolLM2-135M under the engine protocol.

    peer   the per-block sparsities llm-compressor's OWL run realized (read off its pruned
           weights, as `python benchmarks/prune.py --allocation` cached them), so only
           the pruning differs from its run;
    survey our own survey over the first --survey-samples calibration samples (0: all 128,
           as llm-compressor's OWL reads them; default: the config's default).

    python benchmarks/owl_check.py --data-dir ../shared/data [--method wanda] [--sparsity 70]
                                   [--mode peer|survey] [--survey-samples N] [--work benchmarks/.cache/prune]

Prints the allocation, the compression seconds and the perplexity (64 WikiText-2 windows).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune import prepare  # noqa: E402  (puts the repository root on sys.path)


def realized(weights_file: Path, blocks: int) -> dict:
    """{model.layers.i: fraction of zero weights over block i's linears} of a pruned model."""
    from safetensors.torch import load_file

    w = load_file(str(weights_file))
    out = {}
    for i in range(blocks):
        mats = [v for k, v in w.items() if k.startswith(f"model.layers.{i}.") and v.dim() == 2]
        out[f"model.layers.{i}"] = sum(int((v == 0).sum()) for v in mats) / sum(v.numel() for v in mats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    ap.add_argument("--sparsity", type=int, default=70)
    ap.add_argument("--mode", default="peer", choices=["peer", "survey"])
    ap.add_argument("--survey-samples", type=int, default=None)
    ap.add_argument("--work", default=str(HERE / ".cache" / "prune"))
    a = ap.parse_args()
    a.nsamples, a.seqlen, a.windows = 128, 512, 64
    import torch

    import compress
    import compress.survey as survey
    from compress.eval import evaluate

    work = Path(a.work)
    model, windows, _ = prepare(a, work)
    ids = torch.load(work / "calib.pt")
    cfg = {"sparsity": a.sparsity / 100, "allocation": "owl"}
    if a.mode == "peer":
        alloc = realized(work / f"peer-{a.method}-{a.sparsity}-owl" / "weights.safetensors", len(model.model.layers))

        def given(model, configs, ids, **kw):   # stands in for the survey: llm-compressor's allocation
            for c in survey.wants(configs):
                c.allocated = dict(alloc)
            return {}
        survey.survey = given
        print("llm-compressor's allocation:", " ".join(f"{v:.4f}" for v in alloc.values()), flush=True)
    elif a.survey_samples is not None:
        cfg["survey_samples"] = a.survey_samples or None
    t = time.perf_counter()
    compress.run(model, [{a.method: cfg}], calib=ids, batch_size=8)
    seconds = time.perf_counter() - t
    ppl = evaluate(model, windows, batch_size=8, desc="ppl")["ppl"]
    print(f"{a.method} {a.sparsity}% OWL, allocation {a.mode} ({a.survey_samples}): ppl {ppl:.2f} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
