"""DSnoT: prune-and-regrow after a pruning pass (compress/passes/dsnot.py)."""
from types import SimpleNamespace

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.passes.base import Layer, make_config, pass_fn
from helpers import correlated_inputs, is_nm, output_error, stats_of


def chain(W: torch.Tensor, stats, *passes) -> Layer:
    """Run passes [(name, args), ...] in order on one layer, as a sweep does."""
    layer = Layer("layer", W.clone().float(), W.clone().float(), stats)
    for name, args in passes:
        cfg = make_config(name, args)
        pass_fn(cfg)(layer, cfg)
    return layer


def shifted_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with non-zero channel means (as after SiLU or a norm's bias)."""
    g = torch.Generator().manual_seed(seed + 100)
    return correlated_inputs(n, d, seed) + torch.randn(d, generator=g)


def delta(layer: Layer, mu: torch.Tensor) -> torch.Tensor:
    return ((layer.W_dense - layer.W) * mu).sum(1)


def test_hand_computed_swaps():
    # mu = 1 on every input, so delta_i is the sum of row i's pruned weights.
    # Row 0: pruned [2, 1, -0.5], delta = 2.5 > 0. Growing candidates are 0 (2 / var 4 = 0.5)
    #   and 1 (1 / var 1 = 1): the steadier input 1 wins. The only weight whose removal
    #   lowers delta is -1 (col 5): delta = 2.5 - 1 - 1 = 0.5, same sign -> accepted.
    #   Then no cut candidate is left: the row stops.
    # Row 1: pruned [0.5, -1, -2], delta = -2.5 < 0. Grow -2 (col 5; rank 2 > 1) and cut
    #   the positive weight with the lower Wanda score: 0.25 * ||X_4|| = 0.25 < 1 * 2:
    #   delta = -2.5 + 2 + 0.25 = -0.25 -> accepted. Next: grow -1, cut 1 (col 2):
    #   delta = -0.25 + 1 + 1 = 1.75 flips sign -> refused, the row stops.
    W = torch.tensor([[2.0, 1.0, -0.5, 3.0, 1.5, -1.0],
                      [-2.0, 0.5, 1.0, -1.0, 0.25, -2.0]])
    W_hat = torch.tensor([[0.0, 0.0, 0.0, 3.0, 1.5, -1.0],
                          [-2.0, 0.0, 1.0, 0.0, 0.25, 0.0]])
    stats = SimpleNamespace(mean=torch.ones(6), var=torch.tensor([4.0, 1, 1, 1, 1, 1]),
                            norm=torch.tensor([1.0, 1, 2, 1, 1, 1]))
    layer = Layer("layer", W_hat.clone(), W, stats)
    cfg = make_config("dsnot", {})
    pass_fn(cfg)(layer, cfg)
    assert torch.equal(layer.W, torch.tensor([[0.0, 1.0, 0.0, 3.0, 1.5, 0.0],
                                              [-2.0, 0.0, 1.0, 0.0, 0.0, -2.0]]))
    assert layer.info["dsnot_swaps"] == 2
    # var_power 0 ranks row 0's growth by W * mu alone: col 0 (2) with the cut of col 5
    # would give delta = 2.5 - 2 - 1 = -0.5, a flip: refused, row 0 stays as it was.
    layer = Layer("layer", W_hat.clone(), W, stats)
    cfg = make_config("dsnot", {"var_power": 0})
    pass_fn(cfg)(layer, cfg)
    assert torch.equal(layer.W[0], W_hat[0])


@pytest.mark.parametrize("prune", ["magnitude", "wanda", "sparsegpt"])
def test_keeps_row_sparsity_and_shrinks_delta(prune):
    X = shifted_inputs(1024, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = stats_of(X)
    before = chain(W, stats, (prune, {"sparsity": 0.6}))
    after = chain(W, stats, (prune, {"sparsity": 0.6}), ("dsnot", {"threshold": 0.0}))
    assert torch.equal((after.W == 0).sum(1), (before.W == 0).sum(1))      # row sparsity exact
    moved = (after.W != before.W).any(1)
    assert moved.sum() > 16 and after.info["dsnot_swaps"] >= moved.sum()
    # Kept weights keep their value; regrown ones get their dense value back.
    changed = after.W != before.W
    assert torch.equal(after.W[changed & (after.W != 0)], W[changed & (after.W != 0)])
    d0, d1 = delta(before, stats.mean), delta(after, stats.mean)
    assert (d1.abs() <= d0.abs() + 1e-5).all() and (torch.sign(d1) * torch.sign(d0) >= 0).all()
    assert d1.abs().mean() < 0.75 * d0.abs().mean()


@pytest.mark.parametrize("prune", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_stays_exact(prune, pattern, n, m):
    X = shifted_inputs(1024, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    stats = stats_of(X)
    before = chain(W, stats, (prune, {"pattern": pattern}))
    after = chain(W, stats, (prune, {"pattern": pattern}), ("dsnot", {"threshold": 0.0}))
    assert after.nm == (n, m) and is_nm(after.W, n, m)
    groups = lambda L: (L.W != 0).reshape(48, -1, m).sum(-1)  # noqa: E731
    assert torch.equal(groups(after), groups(before))                      # kept count per group
    assert after.info["dsnot_swaps"] > 0
    d0, d1 = delta(before, stats.mean), delta(after, stats.mean)
    assert (d1.abs() <= d0.abs() + 1e-5).all() and d1.abs().mean() < d0.abs().mean()


@pytest.mark.parametrize("prune,sparsity", [("wanda", 0.6), ("wanda", 0.7), ("magnitude", 0.6)])
def test_lowers_output_error_on_correlated_inputs(prune, sparsity):
    X = shifted_inputs(2048, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    stats = stats_of(X)
    base = chain(W, stats, (prune, {"sparsity": sparsity}))
    ds = chain(W, stats, (prune, {"sparsity": sparsity}), ("dsnot", {}))
    assert output_error(W, ds.W, X) < 0.9 * output_error(W, base.W, X)


def test_threshold_and_max_cycles_bound_the_work():
    X = shifted_inputs(512, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    stats = stats_of(X)
    assert chain(W, stats, ("wanda", {"sparsity": 0.5}), ("dsnot", {"max_cycles": 0})).info["dsnot_swaps"] == 0
    one = chain(W, stats, ("wanda", {"sparsity": 0.5}), ("dsnot", {"max_cycles": 1}))
    assert 0 < one.info["dsnot_swaps"] <= 32
    big = chain(W, stats, ("wanda", {"sparsity": 0.5}), ("dsnot", {"threshold": 1e9}))
    assert big.info["dsnot_swaps"] == 0


def test_explicit_pattern_is_checked():
    X = shifted_inputs(256, 16)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    with pytest.raises(CompressError, match="dsnot.pattern: the zeros of layer do not follow 2:4"):
        chain(W, stats_of(X), ("wanda", {"sparsity": 0.5}), ("dsnot", {"pattern": "2:4"}))
    layer = chain(W, stats_of(X), ("wanda", {"pattern": "2:4"}), ("dsnot", {"pattern": "2:4", "threshold": 0}))
    assert is_nm(layer.W, 2, 4)


@pytest.mark.parametrize("args,field", [({"max_cycles": -1}, "dsnot.max_cycles"), ({"max_cycles": 1.5}, "dsnot.max_cycles"),
                                        ({"threshold": -0.1}, "dsnot.threshold"), ({"var_power": "x"}, "dsnot.var_power"),
                                        ({"pattern": "3:2"}, "dsnot.pattern"), ({"guard": 1}, "dsnot.guard"),
                                        ({"cycles": 3}, "unknown argument")])
def test_bad_config(args, field):
    with pytest.raises(CompressError, match=field):
        make_config("dsnot", args)


def test_end_to_end_wanda_2of4_dsnot(tiny_llama):
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = compress.run(tiny_llama, [compress.Wanda(pattern="2:4"), compress.DSnoT(threshold=0.0)],
                                 calib=ids, batch_size=4, compute_dtype="float32")
    rows = report["layers"]
    assert len(rows) == 14 and all(r["passes"] == ["wanda", "dsnot"] for r in rows)
    assert sum(r["dsnot_swaps"] for r in rows) > 0 and report["summary"]["sparsity"] == 0.5
    for name, m in model.named_modules():
        if name.startswith("model.layers") and isinstance(m, torch.nn.Linear):
            assert is_nm(m.weight, 2, 4), name


def test_guard_never_raises_the_modelled_error():
    # With guard, every accepted swap lowers delta_i^2 + sum_j D_ij^2 Var[x_j].
    X = shifted_inputs(1024, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(8))
    stats = stats_of(X)

    def modelled(L):
        D = L.W_dense - L.W
        return ((D * stats.mean).sum(1)) ** 2 + (D.square() * stats.var).sum(1)

    base = chain(W, stats, ("magnitude", {"sparsity": 0.6}))
    plain = chain(W, stats, ("magnitude", {"sparsity": 0.6}), ("dsnot", {"threshold": 0.0}))
    guarded = chain(W, stats, ("magnitude", {"sparsity": 0.6}), ("dsnot", {"threshold": 0.0, "guard": True}))
    assert (modelled(guarded) <= modelled(base) + 1e-4).all()
    assert modelled(guarded).sum() < modelled(base).sum()
    assert guarded.info["dsnot_swaps"] < plain.info["dsnot_swaps"]

