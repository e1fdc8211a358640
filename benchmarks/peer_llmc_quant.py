"""Quantize SmolLM2-135M with llm-compressor as the quantization benchmark's peer
(benchmarks/quant.py): the same model, calibration ids and settings as our rows.

Runs in llm-compressor's own venv (benchmarks/setup_peer.sh) and imports nothing of
ours; it borrows the model loading of benchmarks/peer_llmcompressor.py (same folder).

    python benchmarks/peer_llmc_quant.py --scheme nvfp4|mxfp4|fp8|w4g64 --method rtn|gptq|awq|awq_gptq
                                         [--sparsegpt24] --calib CALIB.pt --out OUTDIR

Schemes (weights only, the activations stay 16-bit): llm-compressor's presets NVFP4A16
and MXFP4A16; FP8 E4M3 per output channel; int4 asymmetric groups of 64. Methods:
QuantizationModifier (rtn), GPTQModifier (gptq), AWQModifier (awq; it quantizes with
RTN after its scaling), AWQModifier then GPTQModifier (awq_gptq). --sparsegpt24 runs
SparseGPTModifier 2:4 first. Every Linear of the decoder blocks is targeted (not lm_head).

Outputs as peer_llmcompressor.py: OUTDIR/weights.safetensors holds the effective weights
(what the quantized model computes with: the library's own fake quantization of each
layer's weight with its scales) of every decoder Linear, and every norm weight (AWQ
folds its scales into them); OUTDIR/result.json the seconds of the `oneshot` call alone
and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_llmcompressor import load_model, peak_rss_kib  # noqa: E402  (sets the offline environment)

import torch  # noqa: E402


def weights_args(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if scheme in ("nvfp4", "mxfp4"):
        return PRESET_SCHEMES[f"{scheme.upper()}A16"]["weights"]
    if scheme == "fp8":
        return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    return QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False,
                            observer="mse")


def build_recipe(a, decoder_cls: str) -> list:
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    def groups():
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights_args(a.scheme))}
    common = dict(ignore=["lm_head"])
    recipe = [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=[decoder_cls])] if a.sparsegpt24 else []
    if a.method == "rtn":
        recipe.append(QuantizationModifier(config_groups=groups(), **common))
    if a.method in ("awq", "awq_gptq"):
        recipe.append(AWQModifier(config_groups=groups(), **common))
    if a.method in ("gptq", "awq_gptq"):
        recipe.append(GPTQModifier(config_groups=groups(), block_size=128, dampening_frac=0.01, actorder="static",
                                   **common))
    return recipe


def effective_weights(model) -> dict:
    """{name: fp32} of every decoder Linear as the quantized model computes with it, and
    every norm weight."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out = {}
    with torch.no_grad():
        for name, mod in model.model.layers.named_modules(prefix="model.layers"):
            if isinstance(mod, torch.nn.Linear):
                W = mod.weight
                scheme = getattr(mod, "quantization_scheme", None)
                if scheme is not None and scheme.weights is not None:
                    W = forward_quantize(mod, W, "weight", scheme.weights)
                out[f"{name}.weight"] = W.detach().float().contiguous().clone()
        for name, p in model.named_parameters():
            if "norm" in name:
                out[name] = p.detach().float().contiguous().clone()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", required=True, choices=["nvfp4", "mxfp4", "fp8", "w4g64"])
    p.add_argument("--method", required=True, choices=["rtn", "gptq", "awq", "awq_gptq"])
    p.add_argument("--sparsegpt24", action="store_true")
    p.add_argument("--calib", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    import datasets
    import llmcompressor
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    ids = torch.load(a.calib).long()
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies
        # (IntermediatesCache.pin_memory); pinning needs an accelerator and raises on a CPU-only
        # machine. Pinning only speeds up transfers, so without a GPU it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    with tempfile.TemporaryDirectory(prefix="peer-llmc-config-") as config_dir:
        model, tokenizer = load_model(config_dir)
        decoder_cls = type(model.model.layers[0]).__name__
        calib = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        recipe = build_recipe(a, decoder_cls)
        t0 = time.perf_counter()
        model = oneshot(model=model, tokenizer=tokenizer, dataset=calib, recipe=recipe,
                        num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                        shuffle_calibration_samples=False, batch_size=1, pipeline="sequential",
                        sequential_targets=[decoder_cls], output_dir=None, log_dir=None)
        seconds = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(effective_weights(model), str(a.out / "weights.safetensors"))
    result = {"scheme": a.scheme, "method": a.method, "sparsegpt24": a.sparsegpt24, "seconds": round(seconds, 3),
              "peak_rss_mib": round(peak_rss_kib() / 1024.0, 1), "llmcompressor": llmcompressor.__version__,
              "torch": torch.__version__}
    (a.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
