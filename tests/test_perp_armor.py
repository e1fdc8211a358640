"""PERP's trainable sets on ARMOR's layers (compress.passes.perp_armor)."""
import copy

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.nn import ArmorLinear
from compress.nn.armor_linear import ArmorResult
from compress.passes.perp_armor import ArmorTrain, kept_index
from helpers import armor_result, check_reload_packed, is_nm


def _layer() -> ArmorLinear:
    return ArmorLinear.from_result(armor_result(), torch.randn(16, generator=torch.Generator().manual_seed(1)))


def test_kept_index_by_hand():
    # one row of 8 inputs: group 0 keeps inputs 0 and 2, group 1 keeps 1 and 3 (inputs 5 and 7)
    keep = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    m = ArmorLinear.from_result(ArmorResult(torch.eye(4)[None].half(), torch.eye(4).repeat(2, 1, 1).half(),
                                            keep.half() * 3, keep))
    assert kept_index(m.positions, 1, 8).tolist() == [[0, 2, 5, 7]]
    # a second row shifts every index by the row's width
    assert kept_index(m.positions.repeat(2, 1), 2, 8).tolist() == [[0, 2, 5, 7], [8, 10, 13, 15]]


@pytest.mark.parametrize("train", [["armor_wrappers"], ["armor_core"], ["armor_wrappers", "armor_core"]])
def test_starts_as_the_layer_and_merges_only_what_it_trains(train):
    m = _layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = ArmorTrain(m, train)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(t(x), m(x), rtol=1e-5, atol=1e-5)           # the same y = A (S (B x))
    assert torch.equal(t.core(), m.core())
    wanted = {"armor_wrappers": {"A", "B"}, "armor_core": {"values"}}
    names = set().union(*(wanted[s] for s in train))
    assert {n for n, p in t.named_parameters() if p.requires_grad} == names
    loss = t(x).square().mean()
    loss.backward()
    torch.optim.SGD(t.parameters_to_train(), lr=0.5).step()
    t.merge()
    after = m.state_dict()
    assert torch.equal(after["positions"], before["positions"]) and torch.equal(after["bias"], before["bias"])
    for k in ("A", "B", "values"):
        assert torch.equal(after[k], before[k]) != (k in names), k
        assert after[k].dtype == torch.float16
    assert is_nm(m.core(), 2, 4)
    # the core kept its positions: every nonzero of the new core sits where the old one kept a value
    kept = torch.zeros(16 * 32, dtype=torch.bool)
    kept[kept_index(before["positions"], 16, 32).reshape(-1)] = True
    assert not (m.core().reshape(-1)[~kept] != 0).any()


SELF = {"source": "self", "nsamples": 8, "seqlen": 32}   # PERP's training text, sampled from the model


def test_end_to_end_lowers_the_loss_keeps_positions_and_reloads(tiny_llama, tiny_tokenizer, tmp_path):
    dense_params = sum(p.numel() for p in tiny_llama.parameters())
    ids = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    armored, _ = compress.run(copy.deepcopy(tiny_llama), [{"sparsegpt": {"pattern": "2:4"}},
                                                          {"armor": {"block_size": 16, "iters": 5}}], calib=ids,
                              batch_size=4)
    perp = {"train": ["norm", "armor_wrappers", "armor_core"], "steps": 30, "lr": 1e-2, "armor_lr": 1e-2, "batch_size": 4,
            "warmup": 0.0, "data": SELF}
    model, report = compress.run(tiny_llama, [{"sparsegpt": {"pattern": "2:4"}},
                                              {"armor": {"block_size": 16, "iters": 5}}, {"perp": perp}],
                                 calib=ids, tokenizer=tiny_tokenizer, batch_size=4)
    start = dict(armored.named_modules())
    mods = {n: m for n, m in model.named_modules() if isinstance(m, ArmorLinear)}
    assert len(mods) == 14
    for n, m in mods.items():
        assert torch.equal(m.positions, start[n].positions), n           # the 2-bit metadata, bit for bit
        assert not torch.equal(m.values, start[n].values) and not torch.equal(m.A, start[n].A), n
        assert is_nm(m.core(), 2, 4)
    tr = report["training"]["perp"]
    assert sum(tr["loss_curve"][-5:]) < 0.9 * sum(tr["loss_curve"][:5])
    wrappers = sum(m.A.numel() + m.B.numel() + m.values.numel() for m in mods.values())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert tr["trainable_params"] == wrappers + norms
    assert tr["trainable_pct"] == pytest.approx(100 * (wrappers + norms) / dense_params)   # of the model as a dense one
    with torch.no_grad():
        logits = model(ids).logits
    out = compress.save(str(tmp_path / "out"), model, tiny_tokenizer, report=report)
    check_reload_packed(out, ids, logits, mods)


def test_masklora_goes_on_the_linears_armor_left(tiny_llama, tiny_tokenizer):
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    armored = {"armor": {"block_size": 16, "iters": 2, "ignore": ["mlp"]}}
    perp = {"train": ["armor_core", "masklora"], "rank": 2, "steps": 2, "batch_size": 2, "data": SELF}
    model, report = compress.run(tiny_llama, [{"sparsegpt": {"pattern": "2:4"}}, armored, {"perp": perp}],
                                 calib=ids, tokenizer=tiny_tokenizer, batch_size=2)
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in model.named_modules() if "layers.0." in n and "proj" in n}
    assert kinds == {"q_proj": "ArmorLinear", "k_proj": "ArmorLinear", "v_proj": "ArmorLinear",
                     "o_proj": "ArmorLinear", "gate_proj": "Linear", "up_proj": "Linear", "down_proj": "Linear"}
    assert report["training"]["perp"]["adapters"] == 8 + 6     # two blocks: 4 ARMOR layers and 3 MaskLoRA'd each


@pytest.mark.parametrize("passes, match", [
    ([{"sparsegpt": {"pattern": "2:4"}}, {"perp": {"train": ["armor_wrappers"]}}],
     "perp.train: armor_wrappers trains ARMOR's layers, but no armor pass runs before perp and the model has none"),
    ([{"armor": {"block_size": 16}}, {"perp": {"train": ["norm", "masklora"]}}],
     "passes: perp runs after armor on model.layers.0.self_attn.q_proj, but armor packs the weights"),
    ([{"armor": {"block_size": 16}}, {"perp": {"train": ["armor_core"], "mode": "reconstruct"}}],
     "perp.train: mode reconstruct fits one adapter"),
])
def test_refused_combinations(tiny_llama, passes, match):
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompressError, match=match):
        compress.run(tiny_llama, passes, calib=ids)


def test_masklora_with_every_layer_packed_is_refused(tiny_llama, tiny_tokenizer):
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompressError, match="perp.train: masklora selects no dense linear layer"):
        compress.run(tiny_llama, [{"armor": {"block_size": 16, "iters": 1}},
                                  {"perp": {"train": ["armor_core", "masklora"], "steps": 1, "data": SELF}}],
                     calib=ids, tokenizer=tiny_tokenizer)


def test_armor_lr_sets_the_rate_of_armor_factors_only(tiny_llama, tiny_tokenizer):
    # At armor_lr 1e-30 Adam moves ARMOR's factors by ~1e-30: nothing survives the fp16
    # rounding of the merge, while the norms (at lr) do train.
    ids = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    armored = [{"sparsegpt": {"pattern": "2:4"}}, {"armor": {"block_size": 16, "iters": 2}}]
    start, _ = compress.run(copy.deepcopy(tiny_llama), armored, calib=ids, batch_size=4)
    perp = {"train": ["norm", "armor_wrappers", "armor_core"], "steps": 3, "lr": 1e-2, "armor_lr": 1e-30,
            "data": SELF}
    model, _ = compress.run(tiny_llama, armored + [{"perp": perp}], calib=ids, tokenizer=tiny_tokenizer, batch_size=4)
    before = start.state_dict()
    for k, v in model.state_dict().items():
        if k.endswith((".A", ".B", ".values", ".positions")):
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "norm" in k)


@pytest.mark.parametrize("value", [0, -1e-3, "fast", True])
def test_bad_armor_lr(value):
    from compress.passes.base import make_config

    with pytest.raises(CompressError, match="perp.armor_lr: expected a positive number"):
        make_config("perp", {"train": ["armor_core"], "armor_lr": value})


def test_perp_on_a_saved_armor_model(tiny_llama, tiny_tokenizer, tmp_path):
    # ARMOR in one run, saved; PERP's armor_* sets in another on the loaded model (no armor pass in that recipe)
    ids = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = compress.run(tiny_llama, [{"armor": {"block_size": 16, "iters": 2}}], calib=ids, batch_size=4)
    out = compress.save(str(tmp_path / "armor"), model, tiny_tokenizer, report=report)
    loaded, tok = compress.load(str(out), dtype=torch.float32)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    perp = {"train": ["armor_core"], "steps": 3, "lr": 1e-2, "armor_lr": 1e-2, "data": SELF}
    loaded, rep = compress.run(loaded, [{"perp": perp}], calib=ids, tokenizer=tok, batch_size=4)
    after = loaded.state_dict()
    changed = [k for k in after if k.endswith(".values") and not torch.equal(after[k], before[k])]
    assert len(changed) == 14 and rep["training"]["perp"]["adapters"] == 14
    assert all(torch.equal(after[k], before[k]) for k in after if k.endswith(".positions"))


def test_armor_perp_result_exports_folded(tiny_llama, tiny_tokenizer, tmp_path):
    # Deployable as ARMOR is: saved, reloaded, then exported with fold to compressed-tensors
    # and GGUF, whose stored weights are the merged layers' effective weights A S B.
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from compress.export import ExportConfig, export_folder

    ids = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    perp = {"train": ["norm", "armor_wrappers", "armor_core"], "steps": 3, "lr": 1e-2, "data": SELF}
    model, report = compress.run(tiny_llama, [{"sparsegpt": {"pattern": "2:4"}}, {"armor": {"block_size": 16, "iters": 2}},
                                              {"perp": perp}], calib=ids, tokenizer=tiny_tokenizer, batch_size=4)
    out = compress.save(str(tmp_path / "out"), model, tiny_tokenizer, report=report)
    want = {n: m.effective_weight().detach().float() for n, m in model.named_modules() if isinstance(m, ArmorLinear)}
    ct = export_folder(str(out), str(tmp_path / "ct"), ExportConfig(format="compressed-tensors", fold=True, dtype="float32"))
    sd = load_file(str(ct / "model.safetensors"))
    assert len(want) == 14 and all(torch.equal(sd[f"{n}.weight"], W) for n, W in want.items())
    gg = export_folder(str(out), str(tmp_path / "gguf"), ExportConfig(format="gguf", fold=True, gguf_type="F16"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(gg / "model.gguf")).tensors}
    down = np.asarray(tensors["blk.0.ffn_down.weight"].data, dtype=np.float32)       # [out, in], F16
    assert np.allclose(down, want["model.layers.0.mlp.down_proj"].numpy(), atol=1e-3, rtol=1e-3)
