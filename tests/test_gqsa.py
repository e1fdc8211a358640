"""The gqsa pass: group OBS saliency by hand and against a brute-force least squares,
the row-balanced group-sparse layout, GroupSparseResult / GQSALinear storage, one-shot
quality against magnitude + RTN, BQPO (it improves the block, keeps the group mask, and
never makes things worse), save / load and validation."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.errors import CompressError
from compress.nn import module_for
from compress.nn.gqsa_linear import GQSALinear, GroupSparseResult
from compress.packing import unpack_bits
from compress.passes.base import BLOCK_FNS, Layer, make_config, pass_fn
from compress.passes.gqsa import FakeQuantGroups, group_saliency
from compress.quantize import QuantSpec, grouped, rtn
from compress.runner import preflight
from helpers import check_cast_keeps_packed_state, check_reload_packed, correlated_inputs, is_nm, output_error, stats_of
from test_quant import calib_ids, hessian_stats


def gqsa_layer(W, stats, **args):
    """Run the gqsa layer function on a copy of W; return the Layer (W and the packed result)."""
    cfg = make_config("gqsa", args)
    layer = Layer("layer", W.clone().float(), W.clone().float(), stats)
    pass_fn(cfg)(layer, cfg)
    return layer


def group_mask(idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[out, k] kept-group indices -> bool [out, G]."""
    return torch.zeros(idx.shape[0], n_groups, dtype=torch.bool).scatter_(1, idx.long(), True)


def gqsa_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, GQSALinear)}


# ----------------------------------------------------------------------------- group saliency

def test_saliency_diagonal_hessian_by_hand():
    # H = diag(h), h = [1, 1, 2, 2, 3, 3, 4, 4]: mean 2.5, percdamp 0.2 -> lambda = 0.5.
    # (H + lambda I)^-1 is diagonal, so [(H^-1)_GG]^-1 = diag(h_j + lambda) and
    # eps = sum_{j in G} w_j^2 (h_j + lambda), with h + lambda = [1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 4.5, 4.5].
    #   row 0 = [1, 2, 0, -2 | 1, 0, 0, 1]:      G0 = 1.5 + 4*1.5 + 4*2.5 = 17.5,   G1 = 3.5 + 4.5 = 8
    #   row 1 = [.5, 0, 1, 0 | -2, 2, 1, 0]:     G0 = .25*1.5 + 2.5 = 2.875,     G1 = 4*3.5*2 + 4.5 = 32.5
    H = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]))
    W = torch.tensor([[1.0, 2.0, 0.0, -2.0, 1.0, 0.0, 0.0, 1.0],
                      [0.5, 0.0, 1.0, 0.0, -2.0, 2.0, 1.0, 0.0]])
    info = {}
    eps = group_saliency(W, H, QuantSpec(4, 4), 0.2, "l", info)
    assert eps.shape == (2, 2)
    assert torch.allclose(eps, torch.tensor([[17.5, 8.0], [2.875, 32.5]]), rtol=1e-6)
    assert info["percdamp"] == 0.2


def test_saliency_identity_hessian_is_damped_group_energy():
    # H = I: lambda = percdamp * 1, so eps = (1 + percdamp) * sum_{j in G} w_j^2.
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, 16)                                   # 40 = 16 + 16 + 8: a shorter last group
    eps = group_saliency(W, torch.eye(40), spec, 0.01, "l", {})
    assert torch.allclose(eps, 1.01 * grouped(W, spec).square().sum(-1), rtol=1e-5)


def test_saliency_dead_input_counts_nothing():
    # H_00 = 0: input 0 is dead, its weight is zeroed and H_00 set to 1 before damping:
    # diag [1, 2, 2, 4], mean 2.25, percdamp 0.2 -> lambda 0.45; eps = 2.45 + 2.45 + 4.45.
    H = torch.diag(torch.tensor([0.0, 2.0, 2.0, 4.0]))
    W = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    eps = group_saliency(W, H, QuantSpec(4, 4), 0.2, "l", {})
    assert eps.item() == pytest.approx(9.35, rel=1e-6)
    assert W[0, 0].item() == 5.0                              # the caller's weight is not edited


def brute_force_saliency(W, H, group_size, percdamp):
    """eps[i, G] = min over the other weights of row i of (w - w')^T Hd (w - w') with
    w'_G = 0, Hd = H + percdamp * mean(diag H) I, solved as a least-squares problem:
    with Hd = L L^T and d = w - w' (d_G = w_G fixed, d_R free), minimize
    ||L^T[:, R] d_R + L^T[:, G] w_G||^2."""
    W, H = W.double(), H.double()
    Hd = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Lt = torch.linalg.cholesky(Hd).T
    d_in = W.shape[1]
    groups = [list(range(s, min(s + group_size, d_in))) for s in range(0, d_in, group_size)]
    eps = torch.zeros(W.shape[0], len(groups), dtype=torch.float64)
    for i in range(W.shape[0]):
        for gi, G in enumerate(groups):
            R = [j for j in range(d_in) if j not in G]
            b = -(Lt[:, G] @ W[i, G])
            d_R = torch.linalg.lstsq(Lt[:, R], b[:, None]).solution[:, 0]
            d = torch.zeros(d_in, dtype=torch.float64)
            d[G], d[R] = W[i, G], d_R
            eps[i, gi] = d @ Hd @ d
            # Any other w' with w'_G = 0 does worse (the least-squares solution is the minimum).
            d[R] += 0.01 * torch.randn(len(R), dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            assert d @ Hd @ d > eps[i, gi]
    return eps


@pytest.mark.parametrize("d_in,group_size", [(12, 4), (14, 4), (10, 3)])
def test_saliency_is_constrained_least_squares_minimum(d_in, group_size):
    g = torch.Generator().manual_seed(d_in)
    X = torch.randn(3 * d_in, d_in, generator=g) @ (torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g))
    H = 2 * X.T @ X / X.shape[0]                               # SPD, strongly correlated inputs
    W = torch.randn(5, d_in, generator=g)
    eps = group_saliency(W, H, QuantSpec(4, group_size), 0.01, "l", {})
    want = brute_force_saliency(W, H, group_size, 0.01)
    assert eps.shape == want.shape == (5, -(-d_in // group_size))
    assert torch.allclose(eps.double(), want, rtol=1e-4)
    # With correlated inputs the saliency is not the group's energy in H's diagonal alone.
    diag_only = (grouped(W, QuantSpec(4, group_size)).square()
                 * grouped((H.diagonal() * 1.0)[None].expand(5, -1), QuantSpec(4, group_size))).sum(-1)
    assert not torch.allclose(eps, diag_only, rtol=0.05)


# ----------------------------------------------------------------------------- row-balanced layout

@pytest.mark.parametrize("d_in,group_size,sparsity,kept", [
    (64, 16, 0.5, 2),      # G = 4, 2 pruned
    (72, 16, 0.5, 3),      # G = 5 (the last group holds 8 inputs), round(2.5) = 2 pruned (halves to even)
    (96, 16, 0.7, 2),      # G = 6, round(4.2) = 4 pruned
    (64, 8, 0.3, 6),       # G = 8, round(2.4) = 2 pruned
    (40, 16, 0.25, 2),     # G = 3, round(0.75) = 1 pruned (truncation would keep every group)
    (64, 16, 0.0, 4),
])
def test_row_balanced_group_sparsity(d_in, group_size, sparsity, kept):
    X = correlated_inputs(1024, d_in, seed=2)
    W = torch.randn(24, d_in, generator=torch.Generator().manual_seed(2))
    stats = stats_of(X)
    layer = gqsa_layer(W, stats, bits=4, group_size=group_size, sparsity=sparsity)
    spec, res = QuantSpec(4, group_size), layer.packed
    G = spec.n_groups(d_in)
    assert isinstance(res, GroupSparseResult) and res.d_in == d_in
    assert res.idx.shape == (24, kept) and res.codes.shape == (24, kept, group_size)
    assert (res.idx[:, 1:] > res.idx[:, :-1]).all()                       # ascending, distinct
    keep = group_mask(res.idx, G)
    assert (keep.sum(1) == kept).all()                                    # the same count in every row
    Wg = grouped(layer.W, spec)                                           # [out, G, g]
    assert (Wg[~keep] == 0).all()                                         # pruned groups are entirely zero
    assert (Wg[keep] != 0).any(-1).all()                                  # kept groups hold weights
    assert torch.equal(layer.W, res.dequantize())                         # W is the packed result exactly
    # The kept groups are the most salient ones of each row.
    eps = group_saliency(W, stats.hessian(), spec, 0.01, "l", {})
    if kept < G:
        assert (eps.masked_fill(~keep, float("inf")).amin(1) > eps.masked_fill(keep, -float("inf")).amax(1)).all()


def test_saliency_prunes_the_group_on_quiet_inputs():
    # Inputs 0-3 are 100x quieter than inputs 4-7: the large weights on them cost less
    # than the small ones on the loud inputs, so gqsa prunes group 0 where magnitude
    # would prune group 1.  H = diag(1e-4 ... , 1 ...).
    H = torch.diag(torch.tensor([1e-4] * 4 + [1.0] * 4))
    W = torch.tensor([[3.0, -3.0, 2.0, 3.0, 0.5, -0.5, 0.25, 0.5]])
    layer = gqsa_layer(W, hessian_stats(H), bits=4, group_size=4, sparsity=0.5, method="rtn")
    assert layer.packed.idx.tolist() == [[1]]
    assert layer.W[0, :4].tolist() == [0.0] * 4
    # 4-bit asym on [-.5, .5]: s = 1/15 (fp16), z = round(.5 * 15) = 8 (7.5, half to even).
    assert torch.equal(layer.W[0, 4:], rtn(W[:, 4:], None, QuantSpec(4, 4)).dequantize()[0])


def test_earlier_zeros_stay_zero_in_the_one_shot():
    X = correlated_inputs(1024, 64, seed=3)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    W[:, ::4] = 0                                                   # an earlier pass's zeros
    layer = gqsa_layer(W, stats_of(X), bits=4, group_size=16, sparsity=0.5)
    assert (layer.W[:, ::4] == 0).all()
    assert (layer.packed.codes[:, :, ::4].float() == layer.packed.zero[..., None]).all()   # stored as the code of 0


# ----------------------------------------------------------------------------- GroupSparseResult / GQSALinear

def test_group_sparse_result_by_hand():
    # 2 bits, groups of 2, d_in = 5: groups [0, 1], [2, 3], [4] (+ one padding code).
    #   row 0 keeps group 2: codes [0, 3], s = .5, z = 1 -> w_4 = (0 - 1) * .5 = -.5 (the padding is dropped)
    #   row 1 keeps group 0: codes [1, 2], s = 2, z = 0 -> w_0, w_1 = 2, 4
    spec = QuantSpec(2, 2)
    res = GroupSparseResult(spec, torch.tensor([[[0, 3]], [[1, 2]]], dtype=torch.uint8),
                            torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [0.0]]),
                            torch.tensor([[2], [0]]), 5)
    assert res.dequantize().tolist() == [[0.0, 0.0, 0.0, 0.0, -0.5], [2.0, 4.0, 0.0, 0.0, 0.0]]
    m = module_for(res)
    assert isinstance(m, GQSALinear) and m.kept_groups == 1 and m.in_features == 5 and m.out_features == 2
    # 2-bit codes, low bits first: [0, 3] -> 0 | 3 << 2 = 12; [1, 2] -> 1 | 2 << 2 = 9.
    assert m.qweight.tolist() == [[12], [9]] and m.qzeros.tolist() == [[1], [0]]
    assert m.group_idx.dtype == torch.int16 and m.group_idx.tolist() == [[2], [0]]
    assert m.scales.dtype == torch.float16 and m.scales.tolist() == [[0.5], [2.0]]
    assert torch.equal(m.effective_weight(), res.dequantize())


def test_from_dense_keeps_marked_groups_and_wants_balanced_rows():
    W = torch.arange(1.0, 25.0).reshape(2, 12)
    spec = QuantSpec(8, 4)
    dense = rtn(W, None, spec)                                      # [2, 12]: 3 groups per row
    keep = torch.tensor([[True, False, True], [False, True, True]])
    res = GroupSparseResult.from_dense(dense, keep)
    assert res.idx.tolist() == [[0, 2], [1, 2]]
    want = dense.dequantize() * keep.repeat_interleave(4, 1)
    assert torch.equal(res.dequantize(), want)
    assert torch.equal(res.scale, dense.scale[keep].reshape(2, 2))
    with pytest.raises(ValueError, match="same number of groups"):
        GroupSparseResult.from_dense(dense, torch.tensor([[True, False, False], [False, True, True]]))


@functools.lru_cache(maxsize=None)
def _packed(kind):
    """A GroupSparseResult of the gqsa layer function (cached: callers must not edit it)."""
    d_in, args = {
        "asym": (64, dict(bits=4, group_size=16, sparsity=0.5)),
        "sym": (64, dict(bits=4, group_size=16, sparsity=0.5, symmetric=True)),
        "partial_3bit": (72, dict(bits=3, group_size=16, sparsity=0.5)),
        "5bit_g24": (64, dict(bits=5, group_size=24, sparsity=0.4, clip_search=True)),
        "rtn_sym_2bit": (64, dict(bits=2, group_size=8, sparsity=0.75, symmetric=True, method="rtn")),
    }[kind]
    X = correlated_inputs(1024, d_in, seed=4)
    W = torch.randn(8, d_in, generator=torch.Generator().manual_seed(4))
    return gqsa_layer(W, stats_of(X), **args).packed


KINDS = ["asym", "sym", "partial_3bit", "5bit_g24", "rtn_sym_2bit"]


@pytest.mark.parametrize("kind", KINDS)
def test_gqsa_linear_reconstructs_result_bit_for_bit(kind):
    res = _packed(kind)
    m = GQSALinear.from_result(res)
    assert torch.equal(m.effective_weight(), res.dequantize())
    out, k, g = res.codes.shape
    assert torch.equal(unpack_bits(m.qweight, res.spec.bits, k * g).reshape(out, k, g), res.codes)
    assert torch.equal(m.group_idx.long(), res.idx)
    assert (m.qzeros is None) == res.spec.symmetric
    if m.qzeros is not None:
        assert torch.equal(unpack_bits(m.qzeros, res.spec.bits, k).float(), res.zero)
    # The module rebuilt from its (JSON) meta and state is the same module.
    twin = GQSALinear.empty(json.loads(json.dumps(m.meta())))
    twin.load_state_dict(m.state_dict())
    assert torch.equal(twin.effective_weight(), res.dequantize())
    # Forward: the dense matmul with the effective weight, with and without a bias.
    bias = torch.randn(8, generator=torch.Generator().manual_seed(6))
    x = torch.randn(3, 5, res.d_in, generator=torch.Generator().manual_seed(7))
    mb = GQSALinear.from_result(res, bias)
    assert torch.equal(m(x), F.linear(x, res.dequantize()))
    assert torch.equal(mb(x), F.linear(x, res.dequantize(), bias))


@pytest.mark.parametrize("kind,expect", [
    # [out=8, in=64] g16, k = 2 of 4 groups, 4-bit asym:
    #   qweight 8 x ceil(2*16*4/32) = 8 x 4 int32, group_idx 8 x 2 int16, scales 8 x 2 fp16,
    #   qzeros 8 x ceil(2*4/32) = 8 x 1 int32
    ("asym", 8 * 4 * 32 + 8 * 2 * 16 + 8 * 2 * 16 + 8 * 1 * 32),
    ("sym", 8 * 4 * 32 + 8 * 2 * 16 + 8 * 2 * 16),                            # no qzeros
    # [8, 72] g16: G = 5, k = 3, 3 bits: qweight ceil(3*16*3/32) = ceil(4.5) = 5 words
    ("partial_3bit", 8 * 5 * 32 + 8 * 3 * 16 + 8 * 3 * 16 + 8 * 1 * 32),
    # [8, 64] g24: G = 3 (24, 24, 16), floor(1.2) = 1 pruned, k = 2; 5 bits: ceil(2*24*5/32) = 8 words
    ("5bit_g24", 8 * 8 * 32 + 8 * 2 * 16 + 8 * 2 * 16 + 8 * 1 * 32),
    # [8, 64] g8: G = 8, k = 2, 2 bits sym: ceil(2*8*2/32) = 1 word
    ("rtn_sym_2bit", 8 * 1 * 32 + 8 * 2 * 16 + 8 * 2 * 16),
])
def test_storage_bits(kind, expect):
    m = GQSALinear.from_result(_packed(kind), torch.zeros(8))        # the bias is not counted
    assert m.storage_bits() == expect
    assert m.bits_per_weight() == expect / (8 * m.in_features)
    if kind == "asym":
        assert m.qweight.shape == (8, 4) and m.qzeros.shape == (8, 1) and m.bits_per_weight() == 3.5


def test_group_index_widens_past_int16():
    # group_size 1: one group per input; 2^15 groups no longer fit an int16 index.
    assert GQSALinear(32767, 1, 4, 1, True, 2).group_idx.dtype == torch.int16
    m = GQSALinear(32768, 1, 4, 1, True, 2)
    assert m.group_idx.dtype == torch.int32
    assert m.storage_bits() == 1 * 32 + 2 * 32 + 2 * 16                # 8 bits of codes fit one word


def test_cast_keeps_packed_state():
    mods = torch.nn.ModuleList([GQSALinear.from_result(_packed("asym"), torch.randn(8)),
                                GQSALinear.from_result(_packed("sym"))])
    check_cast_keeps_packed_state(mods, 64)
    assert mods[0].group_idx.dtype == torch.int16 and mods[0].scales.dtype == torch.float16


def test_fake_quant_starts_at_the_one_shot_result():
    for kind in KINDS:
        res = _packed(kind)
        fake = FakeQuantGroups(res, None)
        assert torch.equal(fake.weight().detach(), res.dequantize()), kind
        back = fake.result()
        for f in ("scale", "zero", "idx"):
            assert torch.equal(getattr(back, f), getattr(res, f)), (kind, f)
        # The codes too, but for the padding of a shorter last group (never read back).
        g = res.spec.group_size
        real = res.idx[..., None] * g + torch.arange(g) < res.d_in                  # [out, k, g]
        assert torch.equal(back.codes[real], res.codes[real]), kind
        assert torch.equal(back.dequantize(), res.dequantize()), kind
        assert fake.z.requires_grad == (not res.spec.symmetric)
        # Straight-through rounding: gradients reach the latent weights and scales.
        x = torch.randn(4, res.d_in, generator=torch.Generator().manual_seed(8))
        fake(x).square().sum().backward()
        assert fake.W.grad is not None and fake.W.grad.abs().sum() > 0
        assert fake.s.grad is not None and fake.s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- one-shot quality

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_one_shot_beats_group_magnitude_then_rtn(seed, sparsity):
    X = correlated_inputs(2048, 128, seed=seed)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
    spec = QuantSpec(4, 16)
    G, kept = 8, 8 - int(8 * sparsity)
    gptq_layer = gqsa_layer(W, stats_of(X), bits=4, group_size=16, sparsity=sparsity, epochs=5)
    rtn_layer = gqsa_layer(W, stats_of(X), bits=4, group_size=16, sparsity=sparsity, method="rtn")
    # Baseline: prune the same number of groups per row by magnitude (sum of w^2), then RTN.
    energy = grouped(W, spec).square().sum(-1)                                       # [out, G]
    keep_mag = group_mask(energy.topk(kept, dim=1).indices, G)
    baseline = rtn(W, keep_mag.repeat_interleave(16, 1), spec).dequantize()
    assert ((baseline != 0).reshape(32, G, 16).any(-1) == keep_mag).all()
    # The group mask does not depend on the method; with rtn it is saliency mask + RTN exactly.
    keep_sal = group_mask(gptq_layer.packed.idx, G)
    assert torch.equal(group_mask(rtn_layer.packed.idx, G), keep_sal)
    assert torch.equal(rtn_layer.W, rtn(W, keep_sal.repeat_interleave(16, 1), spec).dequantize())
    assert (keep_sal != keep_mag).any()                                              # saliency is not magnitude
    e_gqsa, e_sal_rtn, e_base = (output_error(W, w, X) for w in (gptq_layer.W, rtn_layer.W, baseline))
    assert e_gqsa < e_sal_rtn < e_base
    assert e_gqsa < 0.75 * e_base


# ----------------------------------------------------------------------------- BQPO

class BlockSpy:
    """Wraps the registered gqsa block function: records each layer's group indices and
    weight before BQPO, its Layer after, and the losses BQPO measured."""

    def __init__(self, monkeypatch):
        import compress.passes.gqsa as gqsa_mod

        self.before, self.after, self.losses = {}, {}, []
        real_fn, real_loss = BLOCK_FNS["gqsa"], gqsa_mod._block_loss

        def fn(ctx, cfg):
            for n, L in ctx.layers.items():
                self.before[n] = (L.packed.idx.clone(), L.W.clone())
            self.losses.append([])
            real_fn(ctx, cfg)
            self.after.update({n: (L.packed, L.W.clone()) for n, L in ctx.layers.items()})

        def loss(ctx):
            value = real_loss(ctx)
            self.losses[-1].append(value)
            return value

        monkeypatch.setitem(BLOCK_FNS, "gqsa", fn)
        monkeypatch.setattr(gqsa_mod, "_block_loss", loss)


def _block_of(name):
    return int(name.split(".")[2])


def _run(model, args, compute_dtype, **kw):
    return compress.run(model, [{"gqsa": args}], calib=calib_ids(300), batch_size=2,
                        compute_dtype=compute_dtype, **kw)


@pytest.mark.parametrize("compute_dtype", ["float32", None])   # None: bf16 forwards on a CPU with native bf16
def test_bqpo_lowers_block_error_and_keeps_the_mask(tiny_llama, monkeypatch, compute_dtype):
    ids = calib_ids(300)
    with torch.no_grad():
        dense = tiny_llama(ids).logits
    one_shot, _ = _run(copy.deepcopy(tiny_llama), {"epochs": 0}, compute_dtype)
    spy = BlockSpy(monkeypatch)
    model, report = _run(tiny_llama, {"epochs": 4, "lr": 1e-3, "lr_quant": 1e-3}, compute_dtype)
    gl, ref = gqsa_linears(model), gqsa_linears(one_shot)
    assert len(gl) == 14 and set(gl) == set(ref) == set(spy.after)
    assert len(spy.losses) == 2 and all(len(v) == 2 for v in spy.losses)          # before and after, per block
    per_block = {}
    for row in report["layers"]:
        before, after = row["bqpo_loss"]
        per_block.setdefault(_block_of(row["layer"]), set()).add((before, after))
        assert after <= before and row["passes"] == ["gqsa"]
        assert row["sparsity"] >= 0.5                                                 # half the groups of each row
    assert set(per_block) == {0, 1} and all(len(v) == 1 for v in per_block.values())   # one value per block
    for b, ((before, after),) in per_block.items():
        assert [before, after] == spy.losses[b]                                     # training lowered it: kept
    assert any(after < 0.9 * before for ((before, after),) in per_block.values())
    for n, m in gl.items():
        idx_before, W_before = spy.before[n]
        packed, W_after = spy.after[n]
        G = m.spec.n_groups(m.in_features)
        # BQPO never revives, moves or drops a group.
        assert torch.equal(m.group_idx.long(), idx_before) and torch.equal(packed.idx, idx_before), n
        W = m.effective_weight()
        assert (grouped(W, m.spec)[~group_mask(idx_before, G)] == 0).all(), n
        # The module is what BQPO computed, bit for bit.
        assert torch.equal(W_after, packed.dequantize()) and torch.equal(W, W_after), n
        assert not torch.equal(W, W_before), n                                      # and BQPO did move it
        if _block_of(n) == 0:
            # Block 0 sees the same inputs in both runs: its one-shot start is the epochs-0 result.
            # (Block 1 calibrates on block 0's output, which BQPO changed: compared above instead.)
            assert torch.equal(W_before, ref[n].effective_weight()), n
            assert torch.equal(m.group_idx, ref[n].group_idx), n
    # Blocks closer to the dense ones: the model's logits drift less from the dense model's.
    with torch.no_grad():
        drift = F.mse_loss(model(ids).logits, dense).item()
        drift_one_shot = F.mse_loss(one_shot(ids).logits, dense).item()
    assert drift < 0.5 * drift_one_shot


def test_bqpo_keeps_the_one_shot_when_training_diverges(tiny_llama, monkeypatch):
    one_shot, rep0 = _run(copy.deepcopy(tiny_llama), {"epochs": 0}, "float32")
    assert all("bqpo_loss" not in r for r in rep0["layers"])
    spy = BlockSpy(monkeypatch)
    model, report = _run(tiny_llama, {"epochs": 3, "lr": 10.0, "lr_quant": 10.0}, "float32")
    # Training did diverge in every block ...
    assert len(spy.losses) == 2 and all(after > before for before, after in spy.losses)
    # ... so every block kept its one-shot solution and reports no change.
    for row in report["layers"]:
        before, after = row["bqpo_loss"]
        assert after == before == spy.losses[_block_of(row["layer"])][0]
    gl, ref = gqsa_linears(model), gqsa_linears(one_shot)
    assert set(gl) == set(ref) and len(gl) == 14
    for n, m in gl.items():
        for k in GQSALinear.PACKED:
            assert torch.equal(getattr(m, k), getattr(ref[n], k)), (n, k)
    ids = calib_ids(300)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, one_shot(ids).logits)


def test_save_load_round_trip(tiny_llama, tiny_tokenizer, tmp_path):
    ids = calib_ids(len(tiny_tokenizer))
    model, report = compress.run(tiny_llama, [{"gqsa": {"epochs": 2, "lr": 1e-3, "lr_quant": 1e-3}}],
                                 calib=ids, batch_size=4)
    gl = gqsa_linears(model)
    assert len(gl) == 14 and isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        logits = model(ids).logits
    out = compress.save(str(tmp_path / "out"), model, tiny_tokenizer, report=report)
    entry = json.loads((out / "config.json").read_text())["compress"]
    assert set(entry["modules"]) == set(gl)
    # down_proj [64, 128], groups of 16: G = 8, 4 kept.
    assert entry["modules"]["model.layers.1.mlp.down_proj"] == {
        "type": "GQSALinear", "in_features": 128, "out_features": 64, "bits": 4, "group_size": 16,
        "symmetric": False, "kept_groups": 4, "bias": False}
    # k_proj [32, 64]: G = 4, 2 kept.
    assert entry["modules"]["model.layers.0.self_attn.k_proj"]["kept_groups"] == 2
    loaded, tok = check_reload_packed(out, ids, logits, gl)
    lg = gqsa_linears(loaded)
    assert lg["model.layers.0.mlp.up_proj"].group_idx.dtype == torch.int16
    assert tok("group sparse").input_ids == tiny_tokenizer("group sparse").input_ids


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("args,field", [
    ({"group_size": "channel"}, "gqsa.group_size"), ({"group_size": 0}, "gqsa.group_size"),
    ({"act_order": True, "static_groups": False}, "gqsa.act_order"),    # dynamic groups would need a g_idx
    ({"sparsity": 1.0}, "gqsa.sparsity"), ({"sparsity": -0.1}, "gqsa.sparsity"),
    ({"sparsity": "half"}, "gqsa.sparsity"), ({"sparsity": True}, "gqsa.sparsity"),
    ({"epochs": -1}, "gqsa.epochs"), ({"epochs": 1.5}, "gqsa.epochs"), ({"epochs": True}, "gqsa.epochs"),
    ({"lr": 0}, "gqsa.lr"), ({"lr": -1e-3}, "gqsa.lr"), ({"lr": "1e-3"}, "gqsa.lr"),
    ({"lr_quant": 0}, "gqsa.lr_quant"), ({"bits": 9}, "gqsa.bits"), ({"method": "awq"}, "gqsa.method"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(CompressError, match=field.replace(".", r"\.") + ":"):
        make_config("gqsa", args)


def test_good_arguments_accepted():
    cfg = make_config("gqsa", {})
    assert cfg.spec == QuantSpec(4, 16, False, False) and cfg.sparsity == 0.5 and cfg.epochs == 2
    assert cfg.packs and cfg.needs_xtx
    make_config("gqsa", {"sparsity": 0, "epochs": 0, "group_size": 7, "bits": 8, "lr": 1, "method": "rtn"})
    assert make_config("gqsa", {"method": "rtn"}).needs_stats          # BQPO and saliency need statistics


def test_quant_defaults_and_gqsa_overrides():
    """quant defaults to act_order + static groups + MSE clipping; gqsa to none of them,
    and takes act_order only with static (contiguous) groups."""
    quant, gqsa = make_config("quant", {}), make_config("gqsa", {})
    assert (quant.act_order, quant.static_groups, quant.clip_search) == (True, True, True)
    assert (gqsa.act_order, gqsa.static_groups, gqsa.clip_search) == (False, False, False)
    assert quant.spec.clip_search and not gqsa.spec.clip_search
    cfg = make_config("gqsa", {"act_order": True, "static_groups": True})
    assert cfg.act_order and cfg.static_groups
    with pytest.raises(CompressError, match=r"gqsa\.act_order: needs static_groups: true"):
        make_config("gqsa", {"act_order": True})
    with pytest.raises(CompressError, match=r"gqsa\.act_order: needs static_groups: true"):
        make_config("gqsa", {"act_order": True, "static_groups": False, "clip_search": True})
    make_config("gqsa", {"static_groups": True})                          # static groups alone: fine
    # And the accepted combination runs: row-balanced, contiguous groups, W is the packed result.
    X = correlated_inputs(1024, 64, seed=4)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    layer = gqsa_layer(W, stats_of(X), bits=4, group_size=16, sparsity=0.5, act_order=True, static_groups=True)
    res = layer.packed
    assert res.idx.shape == (16, 2) and torch.equal(layer.W, res.dequantize())
    assert (grouped(layer.W, QuantSpec(4, 16))[~group_mask(res.idx, 4)] == 0).all()


def test_bad_arguments_through_run(tiny_llama):
    with pytest.raises(CompressError, match=r"gqsa\.sparsity: expected a number in \[0, 1\), got 1\.0"):
        compress.run(tiny_llama, [{"gqsa": {"sparsity": 1.0}}], calib=calib_ids(300))


def test_pass_after_gqsa_is_refused(tiny_llama):
    with pytest.raises(CompressError, match="last"):
        compress.run(tiny_llama, [{"gqsa": {}}, {"magnitude": {"sparsity": 0.5}}], calib=calib_ids(300))
    with pytest.raises(CompressError, match="put gqsa last"):
        preflight(tiny_llama, [make_config("gqsa", {}), make_config("quant", {})])
    with pytest.raises(CompressError, match="gqsa runs after quant"):
        preflight(tiny_llama, [make_config("quant", {}), make_config("gqsa", {})])
    # Pruning first, or a later pass on other layers, is fine.
    preflight(tiny_llama, [make_config("wanda", {"sparsity": 0.5}), make_config("gqsa", {})])
    preflight(tiny_llama, [make_config("gqsa", {"targets": ["mlp"]}),
                           make_config("magnitude", {"sparsity": 0.5, "targets": ["self_attn"]})])


# ----------------------------------------------------------------------------- partial targets, earlier masks

def _block0_error(model, dense, ids, batch_size) -> float:
    """Mean over the calibration batches of the MSE between block 0's output in `model`
    and in `dense` (block 0 sees the embeddings in both): BQPO's own measure, taken
    here from the models alone."""
    def output_of(m, x):
        got = []
        hook = m.model.layers[0].register_forward_hook(lambda mod, a, out: got.append(
            out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            m(x)
        hook.remove()
        return got[0].float()
    batches = ids.split(batch_size)
    return sum(F.mse_loss(output_of(model, x), output_of(dense, x)).item() for x in batches) / len(batches)


def _check_bqpo_trained_block_0(tiny_llama, passes, **run):
    """Run `passes` (gqsa last) with gqsa epochs 0 and as given, fp32 forwards. Block 0
    gets the same inputs in both runs, so its epochs-0 result is exactly BQPO's start:
    check that BQPO lowered block 0's output error, by its report and by measuring it,
    and moved the codes while keeping the groups. Returns the trained model's GQSALinears."""
    ids = calib_ids(300, n=4, seq=16)
    dense = copy.deepcopy(tiny_llama)
    zero = [*passes[:-1], {"gqsa": {**passes[-1]["gqsa"], "epochs": 0}}]
    one_shot, rep0 = compress.run(copy.deepcopy(tiny_llama), zero, calib=ids, compute_dtype="float32", **run)
    model, report = compress.run(tiny_llama, passes, calib=ids, compute_dtype="float32", **run)
    gl, ref = gqsa_linears(model), gqsa_linears(one_shot)
    assert set(gl) == set(ref) and gl
    assert all("bqpo_loss" not in r for r in rep0["layers"])                      # epochs 0: BQPO never ran
    rows = {r["layer"]: r for r in report["layers"] if _block_of(r["layer"]) == 0}
    (before, after), = {tuple(r["bqpo_loss"]) for r in rows.values()}             # one value for the block
    assert after < 0.9 * before
    # The report's numbers are the block's real output error, before (the one-shot) and after.
    bs = run.get("batch_size", 8)
    assert _block0_error(one_shot, dense, ids, bs) == pytest.approx(before, rel=1e-4)
    assert _block0_error(model, dense, ids, bs) == pytest.approx(after, rel=1e-4)
    for n in rows:
        m, r = gl[n], ref[n]
        assert torch.equal(m.group_idx, r.group_idx), n                           # the same groups ...
        assert not torch.equal(m.qweight, r.qweight), n                           # ... other codes
        assert not torch.equal(m.effective_weight(), r.effective_weight()), n
    return gl


def test_bqpo_on_some_blocks_only(tiny_llama):
    gl = _check_bqpo_trained_block_0(tiny_llama, [{"gqsa": {"epochs": 1, "targets": [r"layers\.0\."]}}])
    assert sorted({_block_of(n) for n in gl}) == [0] and len(gl) == 7
    assert type(tiny_llama.model.layers[1].mlp.down_proj) is torch.nn.Linear      # block 1 left dense


def test_bqpo_keeps_an_earlier_pattern(tiny_llama):
    gl = _check_bqpo_trained_block_0(tiny_llama, [{"wanda": {"pattern": "2:4"}},
                                                  {"gqsa": {"epochs": 2, "lr": 1e-3, "lr_quant": 1e-3}}],
                                     batch_size=2)
    assert len(gl) == 14 and all(is_nm(m.effective_weight(), 2, 4) for m in gl.values())
