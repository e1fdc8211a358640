"""Mixture-of-Experts: every expert of a fused experts module is a layer, with its own
statistics, compressed in batches, saved and reloaded as it computed (compress.experts,
compress.routing, compress.batch, compress.nn.PackedExperts)."""
import logging

import pytest
import torch

import compress
from archs import MOE_ARCHS, ids, tiny
from compress.batch import ExpertLayer, run_on_experts
from compress.errors import CompressError
from compress.experts import Experts, find_experts
from compress.masks import follows_nm
from compress.models import find_blocks
from compress.nn import PackedExperts, PackedLinear
from compress.passes.base import Layer, make_config, pass_fn
from compress.routing import ExpertsObserver
from compress.runner import all_linears

BATCH = 2


def layer_names(model) -> list[str]:
    """Every linear layer of the decoder, each expert's projection its own."""
    prefix, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        for n, m in all_linears(b, f"{prefix}.{i}", []).items():
            out += getattr(m, "names", [n])
    return out


# ----------------------------------------------------------------------------- statistics

def two_experts(mode: str):
    """A 2-expert Mixtral experts module, 6 tokens routed by hand (top-1), observed."""
    model = tiny("mixtral", num_local_experts=2, num_experts_per_tok=1)
    ex = Experts(model.model.layers[0].mlp.experts, "experts")
    ob = ExpertsObserver(ex, ex.projs, True, mode, "cpu")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0], [1], [1], [0], [1], [1]])
    w = torch.rand(6, 1, generator=torch.Generator().manual_seed(1))
    h = ex.module.register_forward_hook(ob.hook, with_kwargs=True)
    with torch.no_grad():
        ex.module(x, idx, w)
    h.remove()
    return ex, ob, x, idx


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_each_experts_xtx_sums_exactly_the_tokens_it_saw(mode):
    ex, ob, x, idx = two_experts(mode)
    gate, up, down = ex.projs
    assert ob.stats[gate] is ob.stats[up]            # gate and up read one input: one X^T X
    for e in range(2):
        tok = (idx[:, 0] == e) if mode == "routed" else torch.ones(6, dtype=torch.bool)
        xe = x[tok]
        assert int(ob.stats[gate].n[e]) == len(xe)
        torch.testing.assert_close(ob.stats[gate].xtx[e], xe.T @ xe)
        torch.testing.assert_close(ob.stats[gate].norm[e], xe.norm(dim=0))
        W = ex.module.gate_up_proj[e].detach()        # [2I, H]: gate rows, then up rows
        g, u = (xe @ W.T).chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) * u          # the down projection's input
        torch.testing.assert_close(ob.stats[down].xtx[e], a.T @ a, rtol=1e-4, atol=1e-5)


def test_halves_read_the_wrong_way_round_are_refused():
    module = tiny("mixtral").model.layers[0].mlp.experts
    module.is_concatenated = False                   # as if its gate and up rows interleaved (gpt-oss)
    with pytest.raises(CompressError, match=r"experts \(MixtralExperts\): its gating does not read gate_up_proj "
                                            r"as interleaved"):
        Experts(module, "experts")


def test_a_forward_other_than_the_one_read_is_refused_naming_the_class():
    model = tiny("mixtral")
    ex = Experts(model.model.layers[0].mlp.experts, "model.layers.0.mlp.experts")
    ob = ExpertsObserver(ex, ex.projs, False, "all", "cpu")
    ex.module.register_forward_hook(lambda m, a, out: out * 1.5)   # e.g. a scale this toolkit does not model
    ex.module.register_forward_hook(ob.hook, with_kwargs=True)
    with pytest.raises(CompressError, match=r"model.layers.0.mlp.experts \(MixtralExperts\) computes something"):
        with torch.no_grad():
            model(ids(1))


def test_an_unknown_experts_module_is_refused_naming_it():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 8, 8))

    block = torch.nn.ModuleDict({"experts": Odd()})
    with pytest.raises(CompressError, match=r"layers.0.experts \(Odd\) holds fused expert weights \(w\)"):
        find_experts(block, "layers.0")
    assert find_experts(block, "layers.0", refuse=lambda n: False) == {}


# ----------------------------------------------------------------------------- batched = looped

def expert_layer(E=5, out=24, d_in=32, seed=0) -> ExpertLayer:
    from compress.stats import ExpertStats

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out, d_in, generator=g)
    st = ExpertStats(E, d_in, True, "cpu")
    X = torch.randn(E, 64, d_in, generator=g) * torch.rand(E, 1, d_in, generator=g) * 3
    st.update(torch.arange(E), X, torch.full((E,), 64))
    return ExpertLayer("experts.down_proj", W.clone(), W.clone(), st, names=[f"experts.{e}.down_proj" for e in range(E)])


@pytest.mark.parametrize("args", [{"sparsegpt": {"sparsity": 0.5}}, {"sparsegpt": {"pattern": "2:4"}},
                                  {"quant": {"bits": 4, "group_size": 8}},
                                  {"quant": {"bits": 3, "group_size": 8, "static_groups": False}},
                                  {"wanda": {"pattern": "2:4"}}], ids=str)
def test_batched_pass_equals_the_single_layer_function_per_expert(args):
    (name, a), = args.items()
    cfg = make_config(name, a)
    batched = expert_layer()
    run_on_experts(batched, cfg, min_tokens=0)
    for e in range(5):
        one = Layer(f"e{e}", batched.W_dense[e].clone(), batched.W_dense[e].clone(), batched.stats[e])
        pass_fn(cfg)(one, cfg)
        torch.testing.assert_close(batched.W[e], one.W, rtol=1e-5, atol=1e-5)
        if cfg.packs:
            assert torch.equal(batched.packed[e].codes, one.packed.codes) or \
                (batched.packed[e].codes != one.packed.codes).float().mean() < 0.002   # rounding ties only


def test_an_expert_without_tokens_is_compressed_data_free_with_a_warning(caplog):
    layer = expert_layer()
    layer.stats.n[2] = 0
    layer.stats.sum[2] = layer.stats.sumsq[2] = 0
    layer.stats.xtx[2] = 0
    with caplog.at_level(logging.WARNING, logger="compress.batch"):
        run_on_experts(layer, make_config("wanda", {"sparsity": 0.5}), min_tokens=16)
    assert any("experts.2.down_proj saw 0 calibration tokens" in r.getMessage() and "magnitude" in r.getMessage()
               for r in caplog.records)
    W = layer.W_dense[2]
    keep = W.abs() >= W.abs().sort(dim=1).values[:, 16:17]   # magnitude: the 16 largest of 32 per row
    assert torch.equal(layer.W[2] != 0, keep) and layer.infos[2]["data_free"]
    q = expert_layer()
    q.stats.n[1] = 3
    run_on_experts(q, make_config("quant", {"bits": 4, "group_size": 8, "clip_search": False}), min_tokens=16)
    from compress.quantize import QuantSpec, rtn
    torch.testing.assert_close(q.W[1], rtn(q.W_dense[1], None, QuantSpec(4, 8)).dequantize())


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_wanda_2of4_then_gptq_w4_packs_every_expert_and_reloads(arch, tmp_path):
    model, x = tiny(arch), ids()
    names = layer_names(model)
    experts = [n for n in names if ".experts." in n]
    assert experts, arch
    _, report = compress.run(model, [compress.Wanda(pattern="2:4"), compress.Quant(bits=4, group_size=16)],
                             calib=x, batch_size=BATCH)
    for n in names:                                # an expert's projection is a module of PackedExperts
        m = model.get_submodule(n)
        assert isinstance(m, PackedLinear) and follows_nm(m.effective_weight(), 2, 4), n
    assert {r["layer"] for r in report["layers"]} == set(names)
    cov = report["coverage"]
    assert cov["compressed_weights"] == len(names)
    # every decoder weight is compressed but routers (and Qwen3-Next's linear-attention convolutions)
    assert all(g["why"].startswith(("router", "convolution")) for g in cov["untouched"]), cov["untouched"]
    routers = sum(g["parameters"] for g in cov["untouched"])
    assert cov["compressed_parameters"] == cov["decoder_parameters"] - routers
    assert all(r["tokens"] == x.numel() for r in report["layers"] if ".experts." in r["layer"])   # 'all'
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    assert torch.isfinite(logits).all()
    compress.save(str(tmp_path / "out"), model)
    loaded, _ = compress.load(str(tmp_path / "out"))
    assert any(isinstance(m, PackedExperts) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, logits)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_pruned_moe_model_saves_and_reloads_in_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x = tiny(arch), ids()
    _, report = compress.run(model, [compress.SparseGPT(pattern="2:4")], calib=x, batch_size=BATCH,
                             moe_calibration="routed")
    tokens = [r["tokens"] for r in report["layers"] if ".experts." in r["layer"]]
    assert 0 < min(tokens) and max(tokens) < x.numel()   # each expert saw its routed tokens only
    assert report["moe_calibration"] == "routed"
    compress.save(str(tmp_path / "out"), model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for ex in find_experts(find_blocks(loaded)[1][0], "").values():
        for p in ex.projs:
            W = ex.weights(p)
            assert all(follows_nm(W[e], 2, 4) for e in range(ex.num))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_targets_and_ignore_select_single_experts():
    model, x = tiny("qwen3_moe"), ids()
    _, report = compress.run(model, [compress.Magnitude(sparsity=0.5, targets=[r"experts\.\d+\.down_proj"],
                                                        ignore=[r"experts\.[13]\."])], calib=x)
    assert sorted(r["layer"] for r in report["layers"]) == [
        f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(4) for e in (0, 2)]
    W = model.model.layers[1].mlp.experts.down_proj
    assert float((W[0] == 0).float().mean()) == 0.5 and float((W[1] == 0).float().mean()) == 0.0
    assert {"weights": "mlp.experts.*.down_proj.weight", "blocks": 4, "parameters": 4 * 2 * 64 * 32,
            "why": "not targeted by any pass"} in report["coverage"]["ignored"]


def test_routed_calibration_with_an_unreached_expert_falls_back_and_stays_finite(caplog):
    model, x = tiny("mixtral"), ids()
    for block in model.model.layers:   # the router never picks expert 3: its tokens go to expert 0
        block.mlp.experts.register_forward_pre_hook(
            lambda m, args: (args[0], torch.where(args[1] == 3, 0, args[1]), args[2]))
    with caplog.at_level(logging.WARNING, logger="compress.batch"):
        _, report = compress.run(model, [compress.SparseGPT(sparsity=0.5), compress.Quant(bits=4, group_size=16)],
                                 calib=x, moe_calibration="routed")
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["model.layers.0.mlp.experts.3.down_proj"]["tokens"] == 0
    assert rows["model.layers.0.mlp.experts.3.down_proj"]["data_free"]
    assert any("experts.3.gate_proj saw 0 calibration tokens" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_perp_masklora_trains_every_expert_and_keeps_2of4(arch, tiny_tokenizer, tmp_path):
    import copy

    from test_perp import _calib, _pruned_run

    model = tiny(arch, vocab_size=len(tiny_tokenizer))
    pruned, _ = compress.run(copy.deepcopy(model), [compress.Wanda(pattern="2:4")], calib=_calib(tmp_path),
                             tokenizer=tiny_tokenizer, batch_size=2)
    perp = {"train": ["masklora"], "rank": 2, "steps": 3, "lr": 1e-2, "batch_size": 2, "warmup": 0.0}
    _, report = _pruned_run(model, tiny_tokenizer, tmp_path, perp)
    assert report["training"]["perp"]["adapters"] > 0
    for ex in [e for b in find_blocks(model)[1] for e in find_experts(b, "").values()]:
        for p in ex.projs:
            W = ex.weights(p)
            assert all(follows_nm(W[e], 2, 4) for e in range(ex.num)), p.name
    start = {n: p for n, p in pruned.named_parameters() if p.dim() == 3}
    after = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert after.keys() == start.keys() and all(not torch.equal(after[n], start[n]) for n in after)   # trained
    assert all(torch.equal(after[n] == 0, start[n] == 0) for n in after)                           # same mask


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_compressed_tensors_export_writes_every_expert_under_its_published_name(arch, tmp_path):
    from safetensors.torch import load_file

    from compress.export import ExportConfig, export
    from test_export import _ct_dense

    model, x = tiny(arch), ids()
    compress.run(model, [compress.SparseGPT(pattern="2:4"), compress.Quant(bits=4, group_size=16)], calib=x)
    want = {n: model.get_submodule(n).effective_weight() for n in layer_names(model) if ".experts." in n}
    out = export(model, None, str(tmp_path / "ct"), ExportConfig(format="compressed-tensors"))
    sd = load_file(str(out / "model.safetensors"))
    leaf = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if arch == "mixtral" else {}
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    dense = _ct_dense(out)   # compressed-tensors' own dequantization
    for n, W in want.items():
        i, e, proj = n.split(".")[2], n.split(".")[5], n.split(".")[6]
        key = f"model.layers.{i}.{block}.experts.{e}.{leaf.get(proj, proj)}"
        assert f"{key}.weight_packed" in sd and f"{key}.weight" not in sd, key
        assert torch.equal(dense[f"{key}.weight"].float(), W.half().float()), key
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in sd)   # no fused tensor left


def test_hf_export_folds_packed_experts_back_into_the_fused_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.export import ExportConfig, export

    model, x = tiny("qwen3_moe"), ids()
    compress.run(model, [compress.Quant(bits=4, group_size=16, method="rtn")], calib=x)
    with torch.no_grad():
        want = model(x).logits
    out = export(model, None, str(tmp_path / "hf"), ExportConfig(format="hf", dtype="float32"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def moe_dir(tmp_path, tiny_tokenizer):
    """A tiny Qwen3-MoE saved with the tiny tokenizer, for CLI runs that offload or resume."""
    d = tmp_path / "moe"
    tiny("qwen3_moe", vocab_size=len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


SGPT_W4 = [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 16}}]


def test_moe_runs_offloaded_and_resumes_to_the_same_bytes(tmp_path, moe_dir, corpus, monkeypatch):
    from cli import main
    from test_offload import recipe, tensors
    from test_resume import Killed, kill_after

    assert main(["-q", "run", recipe(tmp_path, moe_dir, corpus, SGPT_W4), "--output", str(tmp_path / "a")]) == 0
    offloaded = recipe(tmp_path, moe_dir, corpus, SGPT_W4, offload=True)
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            main(["-q", "run", offloaded, "--output", str(tmp_path / "b")])
    assert main(["-q", "run", offloaded, "--output", str(tmp_path / "b"), "--resume", str(tmp_path / "b.run")]) == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".experts.3.down_proj.qweight" in k for k in a)
    model, _ = compress.load(str(tmp_path / "b"))
    assert isinstance(model.model.layers[3].mlp.experts, PackedExperts)


def test_plan_counts_the_experts_statistics_a_real_run_holds(tmp_path, monkeypatch):
    from compress.plan import plan
    from compress.stats import ExpertStats, InputStats
    from test_plan import _recipe

    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    p = plan(_recipe(tmp_path / "m", compute_dtype="float32", device="cpu"))
    made = []
    for cls in (InputStats, ExpertStats):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _i=init, **k: (_i(self, *a, **k), made.append(self))[0])
    compress.run(model, [compress.SparseGPT(pattern="2:4")], calib=ids(2), compute_dtype="float32")
    nbytes = sum(t.numel() * t.element_size() for s in made for t in (s.sum, s.sumsq, s.xtx))
    assert sum(isinstance(s, ExpertStats) for s in made) == 2 * 4   # gate/up, down of each block's experts
    assert p["statistics_mib"] == nbytes / 4 / 2 ** 20              # one block at a time


def test_batched_cholesky_retries_only_the_failed_expert_with_the_same_damping():
    from compress.linalg import inverse_cholesky

    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 128, generator=g) * torch.logspace(-3, 0, 64)[:, None]   # tiny channels: lambda dominates
    good = A @ A.T / 128
    shift = torch.linalg.eigvalsh(good)[0] + 0.05 * good.diagonal().mean()
    bad = good - shift * torch.eye(64)   # indefinite: percdamp 0.01 fails, 0.1 succeeds
    info = {}
    U = inverse_cholesky(torch.stack([good, bad]), 0.01, "experts", info)
    assert info["percdamp"] == [0.01, 0.1] and info["cholesky_retries"] == [0, 1]
    for H, damp, Ue in ((good, 0.01, U[0]), (bad, 0.1, U[1])):
        one = {}
        assert torch.equal(inverse_cholesky(H.clone(), 0.01, "one", one), Ue) and one["percdamp"] == damp
        Hd = H.clone()
        Hd.diagonal().add_(damp * H.diagonal().mean())   # lambda = percdamp * mean(diag H), percdamp as reported
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
        assert torch.equal(Ue, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_input_broadcast_to_every_expert_is_counted_once_per_expert(dtype):
    """moe_calibration 'all': the gate / up input is the same tensor for every expert (an
    expand, stride 0); its statistics, computed once, equal those of E real copies."""
    from compress.stats import ExpertStats

    x = torch.randn(1, 50, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    fast, slow = ExpertStats(4, 12, True, "cpu"), ExpertStats(4, 12, True, "cpu")
    idx, counts = torch.tensor([0, 2, 3]), torch.tensor([50, 50, 50])
    fast.update(idx, x.expand(3, -1, -1), counts)
    slow.update(idx, x.expand(3, -1, -1).contiguous(), counts)
    for a, b in ((fast.n, slow.n), (fast.sum, slow.sum), (fast.sumsq, slow.sumsq), (fast.xtx, slow.xtx)):
        assert torch.equal(a, b)
    assert fast.n.tolist() == [50, 0, 50, 50] and float(fast.xtx[1].abs().sum()) == 0
