"""Every architecture family end to end (tests/archs.py): each block is replayed with the
arguments the model gives that block, the decoder is found inside any wrapper, and every
run says what it compressed and what it left alone."""
import logging
import re

import pytest
import torch

import compress
from archs import ARCHS, VOCAB, ids, tiny
from test_moe import layer_names
from compress.capture import capture_inputs
from compress.errors import CompressError
from compress.masks import follows_nm
from compress.models import find_blocks
from compress.nn import PackedLinear
from compress.passes.base import make_config
from compress.runner import run_sweep

IGNORE = {"jamba": [r"mamba\.dt_proj"]}   # Jamba's mamba reads dt_proj.weight directly
UNTOUCHED = {   # what no pass compresses, by family: {weights in the block: why (start)}
    "gpt_oss": {"mlp.router.weight": "router"},
    "jamba": {"mamba.conv1d.weight": "convolution", "mamba.A_log": "JambaMambaMixer.A_log",
              "feed_forward.router.weight": "router"},
    "falcon_h1": {"mamba.conv1d.weight": "convolution"},
    "qwen3_next": {"linear_attn.conv1d.weight": "convolution", "mlp.gate.weight": "router",
                   "mlp.shared_expert_gate.weight": "router"},
}
BATCH = 2


def ordinary_forward(model, x):
    """What every block receives and returns in the model's own forward, per batch:
    {block: [(args, kwargs, output hidden states)]}."""
    _, blocks = find_blocks(model)
    seen = {i: [] for i in range(len(blocks))}

    def pre(i):
        return lambda m, args, kwargs: seen[i].append([args, dict(kwargs), None])

    def post(i):
        def hook(m, args, kwargs, out):
            seen[i][-1][2] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(pre(i), with_kwargs=True),
                                                          b.register_forward_hook(post(i), with_kwargs=True))]
    with torch.no_grad():
        for b in range(0, x.shape[0], BATCH):
            model(x[b:b + BATCH], use_cache=False)
    for h in handles:
        h.remove()
    return seen


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


@pytest.mark.parametrize("arch", ARCHS)
def test_block_k_gets_the_models_own_arguments_for_block_k(arch):
    model, x = tiny(arch), ids()
    want = ordinary_forward(model, x)
    _, blocks = find_blocks(model)
    calib = capture_inputs(model, blocks, x, BATCH, "cpu", "cpu")
    assert all(calib.reached)
    for i in range(len(blocks)):
        for b, (args, kwargs, _) in enumerate(want[i]):
            kwargs.pop("hidden_states", None)
            assert_same(calib.args[i][b], tuple(args[1:]), f"{arch} block {i} args")
            assert_same(calib.kwargs[i][b], kwargs, f"{arch} block {i} kwargs")
    assert torch.equal(calib.hidden[0], want[0][0][0][0])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "gpt_oss", "cohere2", "qwen2"])
def test_layer_types_get_their_own_mask_shared_once(arch):
    """Sliding and full layers get different masks (Gemma 3: and rotary tables of
    different bases); layers of one type share one stored object."""
    model = tiny(arch)
    _, blocks = find_blocks(model)
    kw = capture_inputs(model, blocks, ids(), BATCH, "cpu", "cpu").kwargs
    types = model.config.get_text_config().layer_types
    s, f = types.index("sliding_attention"), types.index("full_attention")
    s2 = types.index("sliding_attention", s + 1)
    sliding, full = kw[s][0]["attention_mask"], kw[f][0]["attention_mask"]   # full: None where sdpa is causal
    assert isinstance(sliding, torch.Tensor) and (full is None or not torch.equal(sliding, full))
    assert kw[s][0]["attention_mask"] is kw[s2][0]["attention_mask"]
    if arch == "gemma3_text":
        assert not torch.equal(kw[s][0]["position_embeddings"][0], kw[f][0]["position_embeddings"][0])
        assert kw[s][0]["position_embeddings"][0] is kw[s2][0]["position_embeddings"][0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_recipe_reproduces_the_dense_hidden_states(arch, dtype):
    """A sweep that changes nothing (Wanda at sparsity 0, forwards in the model's dtype)
    must propagate exactly the hidden states the dense model computes after every block."""
    model, x = tiny(arch).to(dtype), ids()
    want = ordinary_forward(model, x)
    got = {}
    cfg = make_config("wanda", {"sparsity": 0.0, "ignore": IGNORE.get(arch, [])})
    run_sweep(model, [cfg], x, batch_size=BATCH, compute_dtype=dtype,
              observe=lambda i, hidden: got.__setitem__(i, [h.clone() for h in hidden]))
    for i, batches in want.items():
        for b, (_, _, out) in enumerate(batches):
            err = float((got[i][b] - out).float().abs().max() / out.float().abs().max())
            assert err <= 1e-6, f"{arch} block {i} batch {b}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_wanda_2of4_then_gptq_w4_packs_every_linear_and_reloads(arch, dtype, tmp_path, caplog):
    """Also in half precision, as a GPU user runs it: the model in fp16 / bf16 and the
    calibration forwards in that dtype (tests/test_half.py compares every pass's error)."""
    model, x = tiny(arch, dtype=dtype), ids()
    prefix, blocks = find_blocks(model)
    ignore = IGNORE.get(arch, [])
    linears = layer_names(model)   # fused experts: each expert's projection
    targeted = [n for n in linears if not any(re.search(p, n) for p in ignore)]
    vision = {k: v.clone() for k, v in model.state_dict().items() if "visual" in k}
    with caplog.at_level(logging.INFO, logger="compress.coverage"):
        _, report = compress.run(model, [compress.Wanda(pattern="2:4", ignore=ignore),
                                         compress.Quant(bits=4, group_size=32, ignore=ignore)], calib=x,
                                 batch_size=BATCH, compute_dtype=str(dtype).replace("torch.", ""))
    for n in targeted:
        m = model.get_submodule(n)
        assert isinstance(m, PackedLinear) and follows_nm(m.effective_weight(), 2, 4), n
    cov = report["coverage"]
    assert cov["compressed_weights"] == len(targeted) and len(report["layers"]) == len(targeted)
    assert {g["weights"]: g["why"].split(" ")[0] for g in cov["untouched"]} == \
        {k: v.split(" ")[0] for k, v in UNTOUCHED.get(arch, {}).items()}
    assert all(g["blocks"] >= 1 for g in cov["untouched"])
    assert [g["weights"] for g in cov["ignored"]] == (["mamba.dt_proj.weight"] if ignore else [])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "compress.coverage"]
    assert len(warned) == len(cov["untouched"]) and all(m.startswith("not compressed: ") for m in warned)
    assert any("coverage: compressed" in r.getMessage() for r in caplog.records)
    assert report["summary"]["targeted_sparsity"] >= 0.5
    summary = report["summary"]
    assert (summary["sparsity"] < summary["targeted_sparsity"]) == bool(cov["untouched"] or cov["ignored"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in vision.items())   # the vision tower is left alone
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.dtype == dtype
    compress.save(str(tmp_path / "out"), model)
    loaded, _ = compress.load(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, logits)


def test_vision_language_wrapper_compresses_the_text_decoder_only():
    model = tiny("qwen2_5_vl")
    prefix, blocks = find_blocks(model)
    assert prefix == "model.language_model.layers" and len(blocks) == 4
    assert len(model.model.visual.blocks) == 6   # longer than the decoder, and not taken for it


def test_a_weight_the_model_reads_directly_is_refused_by_name():
    with pytest.raises(CompressError, match=r"model.layers.0.mamba.dt_proj is never called as a layer.*mamba\\\.dt_proj"):
        compress.run(tiny("jamba"), [compress.Wanda(pattern="2:4")], calib=ids())


class _Toy(torch.nn.Module):
    """Blocks with a ModuleList of 8 experts each, longer than the 2-layer list."""

    def __init__(self, n_layers=2, declared=2):
        from transformers import PretrainedConfig
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=declared)
        block = lambda: torch.nn.ModuleDict({"experts": torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(8)),
                                             "attn": torch.nn.Linear(8, 8)})
        self.layers = torch.nn.ModuleList(block() for _ in range(n_layers))


def test_a_list_of_experts_is_never_taken_for_the_decoder():
    prefix, blocks = find_blocks(_Toy())
    assert prefix == "layers" and len(blocks) == 2


def test_no_list_of_the_declared_depth_is_refused_naming_what_was_found():
    with pytest.raises(CompressError, match=r"expected one list of 3 blocks with linear layers in _Toy, found: layers \(2\)"):
        find_blocks(_Toy(declared=3))


def test_ignored_layers_are_reported_and_not_warned(tiny_llama, caplog):
    x = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="compress.coverage"):
        _, report = compress.run(tiny_llama, [compress.Magnitude(sparsity=0.5, ignore=["down_proj"])], calib=x)
    cov = report["coverage"]
    assert cov["untouched"] == [] and cov["ignored"] == [
        {"weights": "mlp.down_proj.weight", "blocks": 2, "parameters": 2 * 64 * 128, "why": "not targeted by any pass"}]
    assert cov["compressed_weights"] == 12 and cov["decoder_weights"] == 14
    total = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert cov["decoder_parameters"] == total and cov["compressed_parameters"] == total - 2 * 64 * 128
    assert report["summary"]["targeted_sparsity"] == 0.5
    assert report["summary"]["sparsity"] == pytest.approx(0.5 * (total - 2 * 64 * 128) / total)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "compress.coverage"]


def test_targets_restricted_leave_the_rest_warned(tiny_llama, caplog):
    x = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="compress.coverage"):
        _, report = compress.run(tiny_llama, [compress.Magnitude(sparsity=0.5, targets=["mlp"])], calib=x)
    assert {g["weights"] for g in report["coverage"]["untouched"]} == {
        f"self_attn.{p}_proj.weight" for p in "qkvo"}
    assert sum("not compressed: self_attn" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2_5_vl", "gpt_oss"])
def test_offloaded_run_equals_ordinary_run(arch, tmp_path):
    """The catcher pass runs with every block still on the meta device, and each block
    then calibrates on exactly what it does in an ordinary run. Coverage too: gpt-oss's
    untouched experts have their zeros counted from the files."""
    from compress.offload import load_lazy
    from compress.resume import RunState

    model, x = tiny(arch), ids()
    with torch.no_grad():   # zeros in the untouched fused experts, for coverage to count
        for p in model.parameters():
            if p.dim() >= 3:
                p.view(-1)[:7] = 0
    model.save_pretrained(tmp_path / "model")
    passes = [compress.SparseGPT(pattern="2:4")]
    _, want = compress.run(model, passes, calib=x, batch_size=BATCH)
    lazy, _ = load_lazy(str(tmp_path / "model"))
    _, got = compress.run(lazy, passes, calib=x, batch_size=BATCH, state=RunState(str(tmp_path / "run"), "x", False))
    assert [(r["layer"], r["rel_error"]) for r in got["layers"]] == [(r["layer"], r["rel_error"]) for r in want["layers"]]
    assert got["coverage"] == want["coverage"] and got["summary"]["sparsity"] == want["summary"]["sparsity"]
