import pytest
import torch

from compress.errors import CompressError
from helpers import apply, is_nm


def test_hand_computed_rows():
    W = torch.tensor([[1.0, -4.0, 2.0, 3.0],
                      [0.5, 0.1, -0.2, 8.0]])
    got = apply("magnitude", W, None, sparsity=0.5)
    assert torch.equal(got, torch.tensor([[0.0, -4.0, 0.0, 3.0],
                                          [0.5, 0.0, 0.0, 8.0]]))


def test_layer_scope_ranks_whole_matrix():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [10.0, 20.0, 30.0, 40.0]])
    got = apply("magnitude", W, None, sparsity=0.5, scope="layer")
    assert torch.equal(got, torch.tensor([[0.0, 0.0, 0.0, 0.0],
                                          [10.0, 20.0, 30.0, 40.0]]))


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_exact(pattern, n, m):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    got = apply("magnitude", W, None, pattern=pattern)
    assert is_nm(got, n, m)
    assert float((got == 0).float().mean()) == pytest.approx(1 - n / m)
    kept = got != 0
    assert torch.equal(got[kept], W[kept])  # magnitude never changes kept weights


def test_row_sparsity_exact():
    W = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    got = apply("magnitude", W, None, sparsity=0.3)
    assert ((got == 0).sum(1) == 30).all()


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_pruned_count_rounds_not_truncates(scope):
    # 360 * 0.7 = 251.99999999999997 in floating point: truncation would prune 251
    W = torch.randn(2, 360, generator=torch.Generator().manual_seed(3))
    got = apply("magnitude", W, None, sparsity=0.7, scope=scope)
    assert int((got == 0).sum()) == 2 * 252


def test_pruned_count_rule():
    from compress.masks import pruned_count

    assert [pruned_count(n, s) for n, s in [(360, 0.7), (10, 0.25), (10, 0.35), (9, 0.5), (7, 0.5)]] == [252, 2, 4, 4, 4]


@pytest.mark.parametrize("args,field", [
    ({"sparsity": 1.0}, "magnitude.sparsity"),
    ({"sparsity": -0.1}, "magnitude.sparsity"),
    ({"pattern": "3:2"}, "magnitude.pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, "magnitude.sparsity"),
    ({"scope": "column"}, "magnitude.scope"),
    ({"pattern": "2:4", "scope": "layer"}, "magnitude.scope"),   # N:M ranks within a row's groups
    ({"sparsty": 0.5}, "sparsty"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(CompressError, match=field):
        apply("magnitude", torch.ones(2, 4), None, **args)


def test_nm_on_indivisible_layer_names_layer():
    with pytest.raises(CompressError, match="layer layer has input size 6"):
        apply("magnitude", torch.ones(2, 6), None, pattern="2:4")


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_topk_mask_is_the_stable_sort_rule(scope):
    """Selection (kthvalue) with ties broken by index equals the first k of a stable sort,
    on scores full of ties, with a leading expert dimension, and with NaN."""
    from compress.masks import pruned_count, topk_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        score = torch.randint(0, 3 + trial % 5, (2, 6, 10), generator=g).float()
        if trial % 4 == 0:
            score[0, 1, 2] = float("nan")
        for sparsity in (0.0, 0.3, 0.5, 0.9, 1.0):
            flat = score if scope == "row" else score.reshape(2, -1)
            drop = flat.argsort(dim=-1, stable=True)[..., :pruned_count(flat.shape[-1], sparsity)]
            want = torch.ones_like(flat, dtype=torch.bool).scatter_(-1, drop, False).reshape(score.shape)
            assert torch.equal(topk_mask(score, sparsity, scope), want), (trial, sparsity)
