import pytest
import torch

from helpers import apply, correlated_inputs, is_nm, output_error, stats_of


def test_hand_computed_score():
    # Input norms ||X_j|| = [1, 2, 4, 8]: S = |W| * ||X|| = [4, 6, 8, 8] for W = [4, 3, 2, 1],
    # so Wanda prunes the two *largest* weights, where magnitude would prune 2 and 1.
    X = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    W = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    got = apply("wanda", W, stats_of(X, xtx=False), sparsity=0.5)
    assert torch.equal(got, torch.tensor([[0.0, 0.0, 2.0, 1.0]]))


def test_stats_norm_is_l2_over_tokens():
    X = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(stats_of(X).norm, torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_exact(pattern, n, m):
    X = correlated_inputs(256, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    got = apply("wanda", W, stats_of(X, xtx=False), pattern=pattern)
    assert is_nm(got, n, m) and float((got == 0).float().mean()) == 0.5


def test_beats_magnitude_on_outlier_channels():
    X = correlated_inputs(2048, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    wanda = apply("wanda", W, stats_of(X, xtx=False), sparsity=0.5)
    mag = apply("magnitude", W, None, sparsity=0.5)
    assert output_error(W, wanda, X) < 0.5 * output_error(W, mag, X)
