"""CUDA checks of whole models: each runtime module type loaded onto the GPU
(compress.load(device=)) against the CPU load, perplexity evaluated on the GPU against
the CPU's, and a calibration run in fp16 on the GPU against the fp32 run on the CPU.

    python -m pytest -m cuda                              # on a GPU (benchmarks/gpu_check.sh)
    COMPRESS_REHEARSE_CUDA=1 python -m pytest -m cuda     # rehearsal on a CPU

Without a GPU every test here skips. The rehearsal runs them on the CPU (the same code
paths minus CUDA: deploy keeps the reference kernels and plain 2:4 linears, and loads in
fp16 as CUDA does by default), so that this file is debugged before GPU time is spent on
it. The kernels' own CUDA checks: test_cuda_kernels.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from archs import ids as arch_ids
from archs import tiny
from helpers import correlated_inputs
from test_cli import tiny_dir  # noqa: F401  (the CLI tests' saved tiny model folder)
from test_kernels import rel

import compress
from cli import main
from compress.models import find_blocks
from compress.nn import runtime_modules
from compress.nn.sparse_linear import SparseLinear
from compress.stats import InputStats

pytestmark = pytest.mark.cuda

# Every linear of these tiny Llamas is a multiple of 64 wide (k/v: 4 heads of 16), as the
# sparse tensor cores want; the MoE is Mixtral's fused experts (PackedExperts).
LLAMA = dict(num_hidden_layers=2, num_key_value_heads=4)
W4 = {"quant": {"bits": 4, "group_size": 32}}
# module type -> (arch, passes, {runtime module type: the kernel compress.deploy.choose gives it on CUDA})
BUILDS = {
    "QuantLinear": ("llama", [W4], {"QuantLinear": "triton-wNa16"}),
    "SparseQuantLinear": ("llama", [{"sparsegpt": {"pattern": "2:4"}}, W4],
                          {"SparseQuantLinear": "triton-2:4+wNa16"}),
    "FPLinear": ("llama", [{"quant": {"format": "nvfp4"}}], {"FPLinear": "triton-fp"}),
    # No fast kernel for these: their plain-torch forward is deploy's documented choice.
    "GQSALinear": ("llama", [{"gqsa": {"bits": 4, "group_size": 16, "sparsity": 0.25, "epochs": 1}}],
                   {"GQSALinear": "reference"}),
    "GGMLLinear": ("llama", [{"quant": {"format": "gguf-q4_0"}}], {"GGMLLinear": "reference"}),
    "ArmorLinear": ("llama", [{"armor": {"iters": 5}}], {"ArmorLinear": "armor-bmm+2:4"}),
    # The experts' forward is the model's own on their rebuilt dense weights; attention is
    # QuantLinear. Loaded in fp32 (FP32_LOADS): in fp16 a router's near-tie flips a token's
    # experts (one token of 32 off by 3e-2 in an fp16 run on the CPU), which is no kernel's fault.
    "PackedExperts": ("mixtral", [{"quant": {"bits": 4, "group_size": 16, "method": "rtn"}}],
                      {"QuantLinear": "triton-wNa16", "PackedExperts": "reference"}),
    # Saved as plain linears with zeros in place; deploy compresses them on CUDA.
    "SparseLinear": ("llama", [{"sparsegpt": {"pattern": "2:4"}}], {"SparseLinear": "cusparselt-2:4"}),
}

FP32_LOADS = {"PackedExperts"}


def kernels_of(model) -> dict:
    """{module type: {kernels}} of the runtime modules (compress.nn) and SparseLinears."""
    mods = [*runtime_modules(model).values(), *(m for m in model.modules() if isinstance(m, SparseLinear))]
    out: dict = {}
    for m in mods:
        out.setdefault(type(m).__name__, set()).add(getattr(m, "kernel", "reference"))
    return out


@pytest.mark.parametrize("kind", list(BUILDS))
def test_load_on_the_device_matches_the_cpu_load(kind, cuda_device, rehearsal, tmp_path):
    """compress.load(out, device=) of each runtime module type: every layer gets the kernel
    deploy documents for it, and the logits are the CPU load's (fp32, plain torch)."""
    arch, passes, on_cuda = BUILDS[kind]
    model = tiny(arch, **(LLAMA if arch == "llama" else dict(num_hidden_layers=2)))
    compress.run(model, passes, calib=arch_ids(8, 32), device="cpu", compute_dtype="float32")
    out = compress.save(str(tmp_path / "out"), model)
    x = arch_ids(2, 16, seed=1)
    cpu, _ = compress.load(str(out))                                   # the reference: fp32, plain torch
    # On CUDA, load deploys in fp16 by default; the rehearsal asks for it, to round as the GPU does.
    dtype = torch.float32 if kind in FP32_LOADS else torch.float16
    dev, _ = compress.load(str(out), device=cuda_device, dtype=dtype if rehearsal or kind in FP32_LOADS else None)
    assert next(dev.parameters()).dtype == dtype
    want = {t: {"reference"} for t in on_cuda if t != "SparseLinear"} if rehearsal else \
        {t: {k} for t, k in on_cuda.items()}
    assert kernels_of(dev) == want
    with torch.no_grad():
        ref, got = cpu(x).logits, dev(x.to(cuda_device)).logits
    err = rel(got.float().cpu(), ref)
    assert err < (2e-2 if dtype == torch.float16 else 1e-3), err       # rounding, not a wrong kernel


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture
def text_dir(tmp_path):
    """A data folder laid out like shared/data, with a made-up wikitext-2 test split."""
    d = tmp_path / "data"
    (d / "wikitext-2-raw").mkdir(parents=True)
    lines = [f" = Section {i} = \n The weights of layer {i} are pruned , then {i % 7} bits are kept .\n"
             for i in range(120)]
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines))
    return d


def test_eval_command_on_the_device_equals_cpu(tiny_dir, text_dir, cuda_device, capsys):
    """`compress eval --device cuda`: the same perplexity as on the CPU (both fp32)."""
    ppl = []
    for device in ("cpu", cuda_device.type):
        assert main(["-q", "eval", str(tiny_dir), "--device", device, "--seqlen", "64", "--max-windows", "4",
                     "--data-dir", str(text_dir)]) == 0
        result = json.loads(capsys.readouterr().out)["model"]
        assert result["windows"] == 4
        ppl.append(result["ppl"])
    assert abs(ppl[1] / ppl[0] - 1) < 1e-4, ppl                      # fp32 sums differ in order only


def test_fp16_model_evaluated_on_the_device(tiny_llama, tiny_tokenizer, text_dir, cuda_device):
    """evaluate(device=) of an fp16 model: log-probs are taken in fp32, so the perplexity
    moves only by the fp16 forward's rounding from the fp32 CPU one."""
    from compress.eval import eval_windows, evaluate
    windows = eval_windows(tiny_tokenizer, (text_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(), 64, 4)
    ppl32 = evaluate(tiny_llama, windows)["ppl"]
    half = copy.deepcopy(tiny_llama).half()
    ppl16 = evaluate(half, windows, device=cuda_device)["ppl"]
    assert next(half.parameters()).device.type == "cpu"                 # moved there and back
    assert abs(ppl16 / ppl32 - 1) < 1e-3, (ppl16, ppl32)


def test_recipe_on_the_device_evaluates_like_cpu(tiny_dir, text_dir, corpus, cuda_device, tmp_path):
    """A recipe with `runner: {device: cuda}`: calibration and evaluation on the GPU give
    the CPU's perplexities (dense: the same model; compressed: masks from the GPU's
    statistics, which round differently)."""
    reports = []
    for i, device in enumerate(("cpu", cuda_device.type)):
        recipe = tmp_path / f"recipe{i}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": str(tiny_dir), "calib": {"source": "text", "path": str(corpus), "nsamples": 8, "seqlen": 32},
            "passes": [{"wanda": {"pattern": "2:4"}}], "runner": {"device": device, "compute_dtype": "float32"},
            "eval": {"dataset": "wikitext2", "seqlen": 64, "max_windows": 4, "data_dir": str(text_dir)}}))
        assert main(["-q", "run", str(recipe), "--output", str(tmp_path / f"out{i}")]) == 0
        reports.append(json.loads((tmp_path / f"out{i}" / "report.json").read_text()))
    cpu, dev = reports
    assert dev["device"].startswith(cuda_device.type)
    assert abs(dev["eval"]["dense"]["ppl"] / cpu["eval"]["dense"]["ppl"] - 1) < 1e-4
    assert abs(dev["eval"]["compressed"]["ppl"] / cpu["eval"]["compressed"]["ppl"] - 1) < 1e-3
    assert dev["eval"]["compressed"]["kl"] > 0 and dev["eval"]["compressed"]["kl"] == pytest.approx(
        cpu["eval"]["compressed"]["kl"], rel=1e-2)


# ----------------------------------------------------------------------------- fp16 statistics

@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-5), (torch.bfloat16, 1e-3)], ids=["fp16", "bf16"])
def test_input_stats_of_half_activations(dtype, bound, cuda_device):
    """InputStats fed half activations on the device: X^T X against float64. fp16 inputs
    are multiplied in fp32 (an outlier channel of 300 squares past fp16's 65504: inf if
    they were not); bf16 ones in bf16 over chunks of 256 tokens, summed in fp32 (~4e-4)."""
    X = correlated_inputs(4096, 256)
    X[:, :4] *= 300 / X[:, :4].abs().max()
    X = X.to(dtype)
    stats = InputStats(256, True, cuda_device)
    for chunk in X.to(cuda_device).split(1024):                       # four calibration batches
        stats.update(chunk)
    X64 = X.double()
    assert stats.n == 4096 and stats.xtx.dtype == torch.float32
    assert rel(stats.xtx.cpu(), X64.T @ X64) < bound
    assert rel(stats.sum.cpu(), X64.sum(0)) < 1e-6 and rel(stats.sumsq.cpu(), X64.square().sum(0)) < 1e-6


def shadow_xtx(monkeypatch) -> dict:
    """Make every InputStats also sum X^T X in float64 from the same activations. Returns
    what it saw: the activations' dtypes and devices, and the largest relative error of
    the fp32 X^T X against the float64 one after any update."""
    seen = {"dtypes": set(), "devices": set(), "err": 0.0}
    update = InputStats.update

    def shadowed(self, x):
        update(self, x)
        x64 = x.reshape(-1, x.shape[-1]).double()
        self.xtx64 = getattr(self, "xtx64", 0) + x64.T @ x64
        seen["dtypes"].add(x.dtype)
        seen["devices"].add(x.device.type)
        seen["err"] = max(seen["err"], rel(self.xtx, self.xtx64))

    monkeypatch.setattr(InputStats, "update", shadowed)
    return seen


def test_fp16_calibration_on_the_device_matches_fp32_on_cpu(tiny_llama, cuda_device, monkeypatch):
    """SparseGPT 50% with fp16 calibration forwards on the device (compute_dtype float16):
    its statistics are the fp16 activations' X^T X to fp32 accuracy, and it keeps nearly
    the fp32 CPU run's weights with nearly its output error."""
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    passes = [{"sparsegpt": {"sparsity": 0.5}}]
    fp32 = copy.deepcopy(tiny_llama)
    compress.run(fp32, passes, calib=ids, device="cpu", compute_dtype="float32")
    seen = shadow_xtx(monkeypatch)
    half = copy.deepcopy(tiny_llama)
    _, report = compress.run(half, passes, calib=ids, device=str(cuda_device), compute_dtype="float16")
    assert report["compute_dtype"] == "float16" and report["device"].startswith(cuda_device.type)
    assert seen["dtypes"] == {torch.float16} and seen["devices"] == {cuda_device.type}
    assert seen["err"] < 1e-5, seen["err"]
    prefix, _ = find_blocks(half)
    names = [n for n, m in half.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]
    agree = {n: float(((half.get_submodule(n).weight != 0) == (fp32.get_submodule(n).weight != 0)).float().mean())
             for n in names}
    assert len(names) == 14 and min(agree.values()) >= 0.95, agree
    with torch.no_grad():
        dense, a, b = (m(held_out).logits for m in (tiny_llama, fp32, half))
    assert rel(b, dense) <= 1.25 * rel(a, dense), (rel(b, dense), rel(a, dense))   # test_half's FACTOR
    assert rel(b, a) < 0.1 * rel(a, dense), (rel(b, a), rel(a, dense))   # 5e-4 of it on the CPU in fp16
