"""InputStats: the calibration statistics every pass reads, in every input dtype."""
import pytest
import torch

from compress.stats import InputStats


def _stats(x):
    s = InputStats(x.shape[-1], True, x.device)
    s.update(x)
    return s


def test_fp16_xtx_of_large_activations_is_finite_and_exact():
    # |x| = 300: one product is 9e4 > 65504, fp16's largest value, and a 256-token
    # chunk sums 2.3e7. The result must be the fp32 X^T X of the fp16-rounded inputs.
    g = torch.Generator().manual_seed(0)
    x = (300 * torch.sign(torch.randn(2, 300, 16, generator=g))).half()
    got = _stats(x).xtx
    xf = x.float().reshape(-1, 16)
    want = xf.T @ xf
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_bf16_xtx_within_one_rounding_per_chunk():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 1024, 32, generator=g) * 50).bfloat16()
    xf = x.float().reshape(-1, 32)
    want = xf.T @ xf
    rel = ((_stats(x).xtx - want).norm() / want.norm()).item()
    assert rel < 4e-3   # bf16 keeps 8 bits: each chunk's product rounded once (~2e-3 at worst)


def test_sums_and_hessian_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    s = _stats(x)
    assert s.n == 2 and s.mean.tolist() == [2.0, -1.0] and s.var.tolist() == [1.0, 9.0]
    assert s.norm.tolist() == pytest.approx([10 ** 0.5, 20 ** 0.5])
    assert s.hessian().tolist() == [[10.0, -10.0], [-10.0, 20.0]]   # (2/n) X^T X, n = 2


def test_bf16_xtx_of_wide_inputs_from_upper_tiles_is_symmetric_and_close():
    # d_in >= SYM_MIN: only the tiles on and above the diagonal are multiplied, the rest
    # mirrored. 1100 = 367 + 367 + 366 (ragged last tile), three batches.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 700, 1100, generator=g).bfloat16()
    s = InputStats(1100, True, x.device)
    for b in x:
        s.update(b)
    xf = x.float().reshape(-1, 1100)
    want = xf.T @ xf
    assert torch.equal(s.xtx, s.xtx.T)
    assert ((s.xtx - want).norm() / want.norm()).item() < 2e-3
    narrow = InputStats(1100, True, x.device)
    narrow.SYM_MIN = 10 ** 9            # the plain path, one product per chunk
    for b in x:
        narrow.update(b)
    assert ((s.xtx - narrow.xtx).norm() / want.norm()).item() < 2e-3
