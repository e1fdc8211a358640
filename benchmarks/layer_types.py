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

With --smollm2, the same comparison on a real model whose layers differ in type
(`smollm2_alternating`): perplexity of SparseGPT 2:4 with replayed and per-block inputs.

    python benchmarks/layer_types.py --smollm2 --data-dir ../shared/data [--nsamples 32] [--windows 32]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import nullcontext
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from archs import CONFIGS, tiny  # noqa: E402  (the test suite's architecture configs)

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


def layer_types(model) -> list[str]:
    """Each block's attention type: config.layer_types, else one type for all (Mistral's
    window applies to every layer)."""
    cfg = model.config.get_text_config()
    one = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return getattr(cfg, "layer_types", None) or [one] * len(find_blocks(model)[1])


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
    types = layer_types(dense)
    local = defaultdict(list)
    with torch.no_grad():
        for i, (args, kwargs, x, y) in io.items():
            out = cblocks[i](x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            local[types[i]].append(float(((out - y) ** 2).sum() / ((y - x) ** 2).sum()))
    last = max(io)
    final = float(((block_io(model, held)[last][3] - io[last][3]) ** 2).sum() / (io[last][3] ** 2).sum())
    return {t: sum(v) / len(v) for t, v in local.items()}, final


def smollm2_alternating(window: int):
    """SmolLM2-135M as a model whose layers differ in type: its weights in a Qwen2
    config (zero q/k/v biases) with sliding-window attention of `window` tokens on the
    even blocks (block 0 among them) and full attention on the odd ones, as Gemma 2 is
    laid out. Returns (model, tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compress.loading import load_model

    llama, tok = load_model("smollm2-135m")
    c = llama.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=True,
                      use_sliding_window=True, sliding_window=window, bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                   for i in range(c.num_hidden_layers)])
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_proj.bias"):
                p.zero_()
    missing = model.load_state_dict(llama.state_dict(), strict=False).missing_keys
    assert all(k.endswith("_proj.bias") for k in missing), missing
    return model.eval(), tok


def smollm2_rows(args) -> None:
    """Perplexity of SparseGPT 2:4 on the SmolLM2-derived alternating model, replayed
    against per-block inputs (WikiText-2 test, C4 calibration)."""
    from calib import CalibConfig, load_calibration, load_text
    from compress.eval import eval_windows, evaluate

    model, tok = smollm2_alternating(args.smollm2_window)
    windows = eval_windows(tok, load_text("wikitext2", "test", args.data_dir), 512, args.windows)
    calib = load_calibration(CalibConfig(source="c4", nsamples=args.nsamples, seqlen=512, seed=0,
                                         data_dir=args.data_dir), tok)
    print(f"SmolLM2-135M, even blocks sliding (window {args.smollm2_window}), odd blocks full; calibration "
          f"{args.nsamples} x 512 C4 tokens, seed 0; WikiText-2 test, seqlen 512, {args.windows} windows\n")
    print("| model | ppl |\n|---|---|")
    print(f"| dense | {evaluate(model, windows)['ppl']:.2f} |", flush=True)
    for way in ("replayed", "per-block"):
        m = copy.deepcopy(model)
        with mock.patch.object(CalibInputs, "block", replayed) if way == "replayed" else nullcontext():
            compress.run(m, [compress.SparseGPT(pattern="2:4")], calib=calib, batch_size=args.batch_size)
        print(f"| SparseGPT 2:4, {way} inputs | {evaluate(m, windows)['ppl']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--smollm2", action="store_true", help="instead: the SmolLM2-derived model, perplexities")
    ap.add_argument("--smollm2-window", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32, help="WikiText-2 windows (--smollm2)")
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    args = ap.parse_args()
    if args.smollm2:
        return smollm2_rows(args)
    sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 128, (args.nsamples, args.seqlen), generator=g)
    held = torch.randint(3, 128, (8, args.seqlen), generator=g)
    print(f"random models: hidden 128, 6 blocks, window {args.window} < seqlen {args.seqlen}; "
          f"calibration {args.nsamples} x {args.seqlen} random ids, 8 held-out sequences\n")
    print("| family | layer types | identity: replayed | identity: per-block | SparseGPT 2:4 local error by type: "
          "replayed → per-block | final hidden error: replayed → per-block |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        changes = {**sizes, **({"sliding_window": args.window} if "sliding_window" in CONFIGS[arch] else {})}
        res = {}
        for way in ("replayed", "per-block"):
            patch = mock.patch.object(CalibInputs, "block", replayed) if way == "replayed" else nullcontext()
            with patch:
                res[way] = (identity_error(arch, changes, calib[:8], args.batch_size),
                            *sparsegpt_errors(arch, changes, calib, held, args.batch_size))
        counts = defaultdict(int)
        for t in layer_types(tiny(arch, **changes)):
            counts[t] += 1
        local = "; ".join(f"{t}: {res['replayed'][1][t]:.4f} → {res['per-block'][1][t]:.4f}" for t in res["replayed"][1])
        print(f"| {arch} | {', '.join(f'{n} {t}' for t, n in counts.items())} | {res['replayed'][0]:.2e} | "
              f"{res['per-block'][0]:.2e} | {local} | {res['replayed'][2]:.4f} → {res['per-block'][2]:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
