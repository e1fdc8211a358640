"""ARMOR: W_hat = A (W' * M) B with block-diagonal A, B and a 2:4 core."""
import json

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.errors import CompressError
from compress.nn import ArmorLinear
from compress.nn.armor_linear import ArmorResult, factor_product, pack_positions, unpack_core
from compress.passes.base import Layer, make_config, pass_fn
from helpers import check_cast_keeps_packed_state, check_reload_packed, correlated_inputs, is_nm, output_error, stats_of


def chain(W, stats, *passes) -> Layer:
    layer = Layer("layer", W.clone().float(), W.clone().float(), stats)
    for name, args in passes:
        cfg = make_config(name, args)
        pass_fn(cfg)(layer, cfg)
    return layer


def rel_full(W, W_hat, X) -> float:
    return output_error(W, W_hat, X)


def test_block_diagonal_product_by_hand():
    # A = blockdiag([[2]], [[3]]) with b = 1, S = [[1, 2], [3, 4]], B = blockdiag([[1]], [[-1]]):
    # A S B = [[2, -4], [9, -12]].
    A = torch.tensor([[[2.0]], [[3.0]]])
    B = torch.tensor([[[1.0]], [[-1.0]]])
    S = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(factor_product(A, S, B), torch.tensor([[2.0, -4.0], [9.0, -12.0]]))
    # and it is the dense product of the block-diagonal matrices
    A = torch.randn(3, 4, 4)
    B = torch.randn(2, 4, 4)
    S = torch.randn(12, 8)
    assert torch.allclose(factor_product(A, S, B), torch.block_diag(*A) @ S @ torch.block_diag(*B), atol=1e-5)


def test_nowag_start_by_hand():
    # Identical rows: after row then column normalization every |W_bar| is equal, so
    # NoWag-P keeps the inputs of largest h = diag(X^T X): columns 1, 3 and 4, 7.
    # Magnitude would keep 2, 3 and 4, 5.
    W = torch.tensor([[1.0, 2, 3, 4, 4, 3, 2, 1]]).repeat(4, 1)
    X = torch.diag(torch.tensor([1.0, 4, 2, 3, 5, 1, 1, 2]).sqrt())
    layer = chain(W, stats_of(X), ("armor", {"block_size": 4, "iters": 0}))
    core = layer.packed.core.float()
    assert torch.equal(core != 0, torch.tensor([[False, True, False, True, True, False, False, True]]).repeat(4, 1))
    assert torch.equal(layer.W, W * (core != 0))                   # A = B = I at the start
    assert layer.info["armor_loss"][0] == layer.info["armor_loss"][1]


def test_positions_pack_round_trip():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(6, 24, generator=g)
    keep = torch.zeros(6, 6, 4, dtype=torch.bool).scatter_(2, score.reshape(6, 6, 4).topk(2, -1).indices, True)
    keep = keep.reshape(6, 24)
    S = torch.randn(6, 24, generator=g) * keep
    meta = pack_positions(keep)
    assert meta.shape == (6, 3) and meta.dtype == torch.uint8
    assert torch.equal(unpack_core(S[keep].reshape(6, 12), meta, 24), S)


@pytest.mark.parametrize("loss", ["diag", "full"])
def test_loss_never_rises_and_core_is_2of4(loss):
    X = correlated_inputs(1024, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    layer = chain(W, stats_of(X), ("armor", {"block_size": 8, "iters": 40, "loss": loss}))
    l0, l1 = layer.info["armor_loss"]
    assert l1 < 0.9 * l0
    core = layer.packed.core
    assert is_nm(core, 2, 4) and int((core != 0).sum()) <= 32 * 32
    assert torch.equal(layer.W, layer.packed.dequantize())


def test_from_sparsegpt_start_lowers_the_output_error():
    X = correlated_inputs(2048, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    stats = stats_of(X)
    sgpt = chain(W, stats, ("sparsegpt", {"pattern": "2:4"}))
    arm = chain(W, stats, ("sparsegpt", {"pattern": "2:4"}), ("armor", {"block_size": 8, "iters": 60, "loss": "full"}))
    # The start is SparseGPT's own result (its mask and updated weights)...
    start = chain(W, stats, ("sparsegpt", {"pattern": "2:4"}), ("armor", {"block_size": 8, "iters": 0, "loss": "full"}))
    assert torch.allclose(start.W, sgpt.W, atol=1e-3)
    # ...and the factorization improves on it.
    assert rel_full(W, arm.W, X) < 0.9 * rel_full(W, sgpt.W, X)


def test_init_mask_needs_a_mask():
    X = correlated_inputs(256, 16)
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(CompressError, match="armor.init: layer layer has no 2:4 mask"):
        chain(W, stats_of(X), ("armor", {"block_size": 4, "init": "mask"}))


def _result(seed=4, out=16, d_in=32, b=8):
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(out, d_in // 4, 4, dtype=torch.bool)
    keep.scatter_(2, torch.rand(out, d_in // 4, 4, generator=g).topk(2, -1).indices, True)
    core = torch.randn(out, d_in, generator=g) * keep.reshape(out, d_in)
    A = torch.eye(b) + 0.1 * torch.randn(out // b, b, b, generator=g)
    B = torch.eye(b) + 0.1 * torch.randn(d_in // b, b, b, generator=g)
    return ArmorResult(A.half(), B.half(), core.half(), keep.reshape(out, d_in))


def test_module_matches_its_effective_weight():
    res = _result()
    bias = torch.randn(16)
    m = ArmorLinear.from_result(res, bias)
    assert torch.equal(m.effective_weight(), res.dequantize())
    assert is_nm(m.core(), 2, 4) and m.extra_parameters() == 2 * 8 * 8 + 4 * 8 * 8
    x = torch.randn(3, 5, 32)
    assert torch.allclose(m(x), F.linear(x, m.effective_weight(), bias), rtol=1e-4, atol=1e-5)
    # storage: fp16 values (half of the weights), 2-bit positions, fp16 A and B
    assert m.storage_bits() == 16 * 16 * 16 + 16 * 4 * 8 + 16 * (2 * 64 + 4 * 64)


def test_module_keeps_a_zero_kept_value():
    res = _result()
    res.core[0, res.mask[0].nonzero()[0, 0]] = 0.0                          # a kept value of 0
    m = ArmorLinear.from_result(res)
    assert torch.equal(m.core(), res.core.float()) and is_nm(m.core(), 2, 4)


def test_cast_keeps_packed_state():
    mods = torch.nn.ModuleList([ArmorLinear.from_result(_result(), torch.randn(16)), ArmorLinear.from_result(_result(5))])
    check_cast_keeps_packed_state(mods, 32, dense_forward=False)


def test_block_size_must_divide_the_layer(tiny_llama):
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompressError, match="armor.block_size: 48 does not divide the input size 64 of layer "
                                            "model.layers.0.self_attn.q_proj"):
        compress.run(tiny_llama, [compress.Armor(block_size=48)], calib=ids)


def test_save_load_round_trip(tiny_llama, tiny_tokenizer, tmp_path):
    ids = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = compress.run(tiny_llama, [{"sparsegpt": {"pattern": "2:4"}},
                                              {"armor": {"block_size": 16, "iters": 10}}], calib=ids, batch_size=4)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, ArmorLinear)}
    assert len(mods) == 14
    assert all(r["armor_loss"][1] <= r["armor_loss"][0] for r in report["layers"])
    with torch.no_grad():
        logits = model(ids).logits
    out = compress.save(str(tmp_path / "out"), model, tiny_tokenizer, report=report)
    entry = json.loads((out / "config.json").read_text())["compress"]["modules"]
    assert entry["model.layers.1.mlp.down_proj"] == {"type": "ArmorLinear", "in_features": 128, "out_features": 64,
                                                       "block_size": 16, "bias": False}
    check_reload_packed(out, ids, logits, mods)


@pytest.mark.parametrize("args,field", [({"block_size": 6}, "armor.block_size"), ({"block_size": 0}, "armor.block_size"),
                                        ({"iters": -1}, "armor.iters"), ({"preset": "slow"}, "armor.preset"),
                                        ({"lr": 0}, "armor.lr"), ({"loss": "l1"}, "armor.loss"),
                                        ({"init": "random"}, "armor.init"), ({"blocks": 4}, "unknown argument")])
def test_bad_config(args, field):
    with pytest.raises(CompressError, match=field):
        make_config("armor", args)


def test_fast_preset():
    assert make_config("armor", {"preset": "fast"}).n_iters < make_config("armor", {}).n_iters
    assert make_config("armor", {"preset": "fast", "iters": 7}).n_iters == 7
