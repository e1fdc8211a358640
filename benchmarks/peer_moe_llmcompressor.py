"""Compress the upcycled Mixtral of benchmarks/moe.py with llm-compressor: the MoE peer.

Runs in llm-compressor's own venv (benchmarks/setup_peer.sh) and imports nothing of
ours but benchmarks/peer_llmcompressor.py's helpers (which import no `compress` either).

    python benchmarks/peer_moe_llmcompressor.py --model WORK/upcycled --calib CALIB.pt --out OUT
        --method wanda|sparsegpt [--sparsity 0.5] [--pattern unstructured|2:4]
        --method gptq [--bits 4] [--group-size 64]
        [--routed]   # calibrate routed experts only (default: every expert sees every token)

How llm-compressor 0.14 handles Mixtral's fused experts (`mlp.experts.gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I], 3-D parameters no modifier can hook):
`llmcompressor.modeling.moe.linearize.linearize_moe` replaces every fused experts module
(`FusedExpertsProtocol`, i.e. transformers' `@use_experts_implementation` classes such as
`MixtralExperts`) by a `LinearExperts2D` ModuleList of per-expert `gate_proj` / `up_proj`
/ `down_proj` nn.Linear, which the modifiers then target like any other linear.
`oneshot` would do it too (with a warning); we do it before the clock starts, so the
peer's seconds exclude it. `oneshot(moe_calibrate_all_experts=True)` (its default) enters
`moe_calibration_context`: every expert runs on every token (its statistics see all of
them) while only the routed tokens' outputs are kept, our `moe_calibration="all"`.
The router (`MixtralTopKRouter`, not an nn.Linear) is never a target.

Outputs: OUT/weights.safetensors, every decoder weight matrix under the state-dict names
of the fused model (`model.layers.i.mlp.experts.gate_up_proj`, gate rows first, and
`down_proj`, restacked from the per-expert linears; GPTQ's weights are the dequantized
values GPTQ wrote back), and OUT/result.json: seconds of the `oneshot` call, peak RSS
(VmHWM), versions, and per-expert counts (how many expert matrices have zeros, the
zero fraction) so that a run that skipped experts shows.

GPTQ is set up as our `quant` pass's defaults (compress/passes/quant.py): asymmetric
(`symmetric=False`, integer zero points), groups of 64, static activation order (columns
by decreasing H_jj, group parameters fitted up front: our act_order + static_groups), an
MSE observer with our clip_search's grid (shrink 1, 0.99, ..., 0.2, |err|^2.4, no early
stop; llm-compressor's own default stops at 0.8, after 5 steps without gain), block 128,
dampening 0.01.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("LLM_COMPRESSOR_LOG_FILE", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_llmcompressor import PATTERNS, peak_rss_kib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="the upcycled model folder")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt", "gptq"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", choices=sorted(PATTERNS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--routed", action="store_true", help="calibrate only the routed experts")
    p.add_argument("--calib", required=True, type=Path, help="torch.save'd LongTensor [nsamples, seqlen]")
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def build_recipe(a, decoder_cls: str):
    if a.method == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=False, strategy="group",
                                   group_size=a.group_size, observer="mse",
                                   # our clip_search grid: shrink 1 ... 0.2 in steps of 1/100, |err|^2.4, no early stop
                                   observer_kwargs={"maxshrink": 0.8, "grid": 100.0, "norm": 2.4, "patience": 1000})
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")]
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    # the decoder block class as target: its linears (not lm_head, which is tied to the embedding)
    common = dict(sparsity=a.sparsity, mask_structure=PATTERNS[a.pattern], targets=[decoder_cls])
    if a.method == "wanda":
        return [WandaPruningModifier(**common)]
    return [SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)]


def fused_weights(model) -> tuple[dict, dict]:
    """Decoder weight matrices under the fused model's names, and per-expert zero counts."""
    from llmcompressor.modeling.moe.linearize import get_linearized_moes

    out, experts_zero, fractions = {}, 0, []
    moes = dict(get_linearized_moes(model))
    for name, mod in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(mod, torch.nn.Linear) and not any(name.startswith(m + ".") for m in moes):
            out[f"{name}.weight"] = mod.weight.detach().float().contiguous().clone()
    for name, lin in moes.items():
        per = [lin[e] for e in range(lin.num_experts)]
        gate_up = [torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in per]
        down = [x.down_proj.weight for x in per]
        out[f"{name}.gate_up_proj"] = torch.stack(gate_up).detach().float().contiguous()
        out[f"{name}.down_proj"] = torch.stack(down).detach().float().contiguous()
        for x in per:
            for W in (x.gate_proj.weight, x.up_proj.weight, x.down_proj.weight):
                z = float((W == 0).float().mean())
                fractions.append(z)
                experts_zero += z > 0
    stats = {"expert_matrices": len(fractions), "expert_matrices_with_zeros": experts_zero,
             "expert_zero_fraction_min": min(fractions, default=None),
             "expert_zero_fraction_mean": sum(fractions) / max(len(fractions), 1)}
    return out, stats


def load(folder: Path):
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    linearize_moe(model)   # fused 3-D experts -> per-expert nn.Linear (see the docstring)
    return model, AutoTokenizer.from_pretrained(str(folder))


def main(argv=None) -> None:
    a = parse_args(argv)
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    ids = torch.load(a.calib).long()
    nsamples, seqlen = ids.shape
    model, tokenizer = load(a.model)
    decoder_cls = type(model.model.layers[0]).__name__
    # already tokenized, one sample a batch, no shuffling: as benchmarks/peer_llmcompressor.py
    calib = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=calib, recipe=build_recipe(a, decoder_cls),
                    num_calibration_samples=nsamples, max_seq_length=seqlen, shuffle_calibration_samples=False,
                    batch_size=1, pipeline="sequential", sequential_targets=[decoder_cls],
                    moe_calibrate_all_experts=not a.routed, output_dir=None, log_dir=None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rss = peak_rss_kib() / 1024.0   # before the copies made for saving
    weights, stats = fused_weights(model)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(a.out / "weights.safetensors"))
    result = {"method": a.method, "sparsity": a.sparsity, "pattern": a.pattern, "bits": a.bits,
              "group_size": a.group_size, "calibrate_all_experts": not a.routed,
              "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "peak_rss_mib": round(rss, 1),
              "threads": torch.get_num_threads(), "nsamples": nsamples, "seqlen": seqlen, **stats,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "llmcompressor": getattr(llmcompressor, "__version__", None) or importlib.metadata.version("llmcompressor")}
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
