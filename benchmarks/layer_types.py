"""Per-block inputs against block 0's replayed inputs, on random models whose attention
window is shorter than the calibration sequence (issue 16).

Before per-block inputs, the runner fed every block the keyword arguments block 0
received. In models whose layers differ in type, the full-attention layers then ran
with the sliding-window mask (and, in Gemma 3, with the local rotary base). Both ways
are run here on the same random model and the same ids: `replayed` patches the runner
to hand every block block 0's arguments, as it used to; `per-block` is the runner.

For each family (tests/archs.py's configs, made larger):
    identity   max relative error of the runner's propagated hidden states against the
               dense model's, after a sweep that changes nothing (Wanda at sparsity 0,
               fp32): 0 means every block saw what it sees in the model's forward
    local      SparseGPT 2:4's relative output error per block, ||B'(x) - B(x)||^2 /
               ||B(x) - x||^2 (the block's update, not the residual stream), on held-out
               ids, with x and the arguments from the dense model's own forward; mean
               over the blocks of each layer type
    final      relative error of the last block's output in the compressed model's own
               forward against the dense model's, on the held-out ids

    python benchmarks/layer_types.py [--archs gemma2,gemma3_text,...] [--seqlen 64] [--window 16]
"""
from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from archs import tiny  # noqa: E402  (the test suite's architecture configs)

import compress  # noqa: E402
from compress.capture import BlockInput, CalibInputs  # noqa: E402
from compress.models import find_blocks  # noqa: E402
from compress.passes.base import make_config  # noqa: E402
from compress.runner import run_sweep  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_oss", "cohere2", "qwen3_next", "jamba"]
IGNORE = {"jamba": [r"mamba\.dt_proj"]}


def replayed(self, i):
    """The old runner: every block gets block 0's arguments."""
    return [BlockInput(h, self.args[0][b], self.kwargs[0][b]) for b, h in enumerate(self.hidden)]


def block_io(model, x):
    """{block: (args, kwargs, input, output)} of the model's own forward on ids x."""
    _, blocks = find_blocks(model)
    seen = {}

    def hook(i):
        def f(m, args, kwargs, out):
            seen[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"},
                       args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)
        return f
    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(x, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def identity_error(arch, changes, ids, batch) -> float:
    model = tiny(arch, **changes)
    want = [block_io(model, ids[b:b + batch]) for b in range(0, ids.shape[0], batch)]
    got = {}
    cfg = make_config("wanda", {"sparsity": 0.0, "ignore": IGNORE.get(arch, [])})
    run_sweep(model, [cfg], ids, batch_size=batch, compute_dtype=torch.float32,
              observe=lambda i, hidden: got.__setitem__(i, [h.clone() for h in hidden]))
    return max(float((got[i][b] - w[i][3]).abs().max() / w[i][3].abs().max()) for b, w in enumerate(want) for i in w)


def sparsegpt_errors(arch, changes, calib, held, batch) -> tuple[dict, float]:
    dense = tiny(arch, **changes)
    model = copy.deepcopy(dense)
    compress.run(model, [compress.SparseGPT(pattern="2:4", ignore=IGNORE.get(arch, []))], calib=calib,
                 batch_size=batch, compute_dtype="float32")
    _, dblocks = find_blocks(dense)
    _, cblocks = find_blocks(model)
    io = block_io(dense, held)
    types = getattr(dense.config.get_text_config(), "layer_types", None) or ["full_attention"] * len(dblocks)
    local = defaultdict(list)
    with torch.no_grad():
        for i, (args, kwargs, x, y) in io.items():
            out = cblocks[i](x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            local[types[i]].append(float(((out - y) ** 2).sum() / ((y - x) ** 2).sum()))
    last = max(io)
    final = float(((block_io(model, held)[last][3] - io[last][3]) ** 2).sum() / (io[last][3] ** 2).sum())
    return {t: sum(v) / len(v) for t, v in local.items()}, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    changes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, sliding_window=args.window)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 128, (args.nsamples, args.seqlen), generator=g)
    held = torch.randint(3, 128, (8, args.seqlen), generator=g)
    print(f"random models: hidden 128, 6 blocks, window {args.window} < seqlen {args.seqlen}; "
          f"calibration {args.nsamples} x {args.seqlen} random ids, 8 held-out sequences\n")
    print("| family | layer types | identity: replayed | identity: per-block | SparseGPT 2:4 local error by type: "
          "replayed → per-block | final hidden error: replayed → per-block |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        res = {}
        for way in ("replayed", "per-block"):
            patch = mock.patch.object(CalibInputs, "block", replayed) if way == "replayed" else nullcontext()
            with patch:
                res[way] = (identity_error(arch, changes, calib[:8], args.batch_size),
                            *sparsegpt_errors(arch, changes, calib, held, args.batch_size))
        types = tiny(arch, **changes).config.get_text_config()
        counts = defaultdict(int)
        for t in getattr(types, "layer_types", None) or ["full_attention"] * 6:
            counts[t] += 1
        local = "; ".join(f"{t}: {res['replayed'][1][t]:.4f} → {res['per-block'][1][t]:.4f}" for t in res["replayed"][1])
        print(f"| {arch} | {', '.join(f'{n} {t}' for t, n in counts.items())} | {res['replayed'][0]:.2e} | "
              f"{res['per-block'][0]:.2e} | {local} | {res['replayed'][2]:.4f} → {res['per-block'][2]:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
