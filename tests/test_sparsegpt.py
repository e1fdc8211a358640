import pytest
import torch

from compress.stats import InputStats
from helpers import apply, correlated_inputs, is_nm, output_error, stats_of


def hessian_stats(H: torch.Tensor) -> InputStats:
    """Stats whose Hessian (2/n) X^T X is exactly H."""
    s = InputStats(H.shape[0], True, H.device)
    s.n, s.xtx = 2, H.clone()
    return s


def test_two_inputs_obs_update():
    # H = [[1, .5], [.5, 1]], W = [1, 3]: w_1 has the lower saliency w^2/[H^-1]_jj and is
    # pruned; OBS moves w_2 by w_1 * H_12 / H_22 = 0.5, giving [0, 3.5].
    H = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    got = apply("sparsegpt", torch.tensor([[1.0, 3.0]]), hessian_stats(H), sparsity=0.5, percdamp=1e-7)
    assert torch.allclose(got, torch.tensor([[0.0, 3.5]]), atol=1e-5)


def test_identity_hessian_is_magnitude():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    got = apply("sparsegpt", W, hessian_stats(torch.eye(16)), sparsity=0.5, scope="row")
    assert torch.equal(got, apply("magnitude", W, None, sparsity=0.5))


def test_dead_inputs_are_zeroed():
    X = correlated_inputs(512, 16)
    X[:, 3] = 0
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    got = apply("sparsegpt", W, stats_of(X), sparsity=0.25)
    assert (got[:, 3] == 0).all() and torch.isfinite(got).all()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_exact(pattern, n, m):
    X = correlated_inputs(512, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    got = apply("sparsegpt", W, stats_of(X), pattern=pattern, blocksize=16)
    assert is_nm(got, n, m) and float((got == 0).float().mean()) == 0.5


def test_unstructured_sparsity_exact_per_block():
    X = correlated_inputs(512, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    got = apply("sparsegpt", W, stats_of(X), sparsity=0.5, blocksize=16)
    assert int((got == 0).sum()) == 32 * 64 // 2


def test_singular_hessian_retries_damping():
    H = torch.ones(4, 4)  # rank 1: Cholesky fails without enough damping
    from compress.passes.base import Layer, make_config, pass_fn
    cfg = make_config("sparsegpt", {"sparsity": 0.5, "percdamp": 1e-12})
    layer = Layer("l", torch.randn(2, 4), torch.randn(2, 4), hessian_stats(H))
    pass_fn(cfg)(layer, cfg)
    assert layer.info["cholesky_retries"] >= 1 and layer.info["percdamp"] > 1e-12


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_quality_ordering(pattern):
    """SparseGPT error < Wanda < magnitude on correlated inputs (layer output error)."""
    X = correlated_inputs(4096, 128, seed=1)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    args = {"pattern": pattern} if pattern != "unstructured" else {"sparsity": 0.5}
    errs = {p: output_error(W, apply(p, W, stats_of(X), **args), X) for p in ("sparsegpt", "wanda", "magnitude")}
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs
