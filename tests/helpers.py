"""Small builders shared by the pass tests."""
from __future__ import annotations

import torch

from compress.passes.base import Layer, make_config, pass_fn
from compress.stats import InputStats


def stats_of(X: torch.Tensor, xtx: bool = True) -> InputStats:
    """InputStats of calibration inputs X [tokens, d_in]."""
    s = InputStats(X.shape[1], xtx, X.device)
    s.update(X)
    return s


def apply(name: str, W: torch.Tensor, stats, **args) -> torch.Tensor:
    """Run pass `name` on a copy of W [out, in]; return the new weight."""
    cfg = make_config(name, args)
    layer = Layer("layer", W.clone().float(), W.clone().float(), stats)
    pass_fn(cfg)(layer, cfg)
    return layer.W


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens [n, d] with strongly correlated features and a few large-norm ("outlier")
    channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / d ** 0.5
    scale = torch.exp(0.75 * torch.randn(d, generator=g))
    return (Z @ mix) * scale


def is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive inputs of every row holds at most n non-zeros."""
    return bool(((W.reshape(W.shape[0], -1, m) != 0).sum(-1) <= n).all())


def output_error(W, W_hat, X) -> float:
    """||(W - W_hat) X^T||^2 / ||W X^T||^2 on inputs X [tokens, in]."""
    return float(((X @ (W - W_hat).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def check_cast_keeps_packed_state(mods: torch.nn.ModuleList, d_in: int, dense_forward: bool = True) -> None:
    """Casting runtime modules (PackedLinear) moves only their bias to the new dtype:
    packed codes, scales and indices keep dtype and values, so the effective weights
    stay bit for bit; the bf16 forward is F.linear with the rounded effective weight
    (for a factored forward, dense_forward=False: close to it)."""
    import torch.nn.functional as F

    before = [m.effective_weight() for m in mods]
    buffers = {k: v.clone() for k, v in mods.state_dict().items() if "bias" not in k}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        mods.to(dtype)
        for k, v in mods.state_dict().items():
            if "bias" in k:
                assert v.dtype == dtype
            else:
                assert v.dtype == buffers[k].dtype and torch.equal(v, buffers[k]), k
        assert all(torch.equal(m.effective_weight(), w) for m, w in zip(mods, before))
    mods.to(torch.bfloat16)
    x = torch.randn(2, d_in, dtype=torch.bfloat16)
    want = F.linear(x, before[0].to(torch.bfloat16), mods[0].bias)
    if dense_forward:
        assert torch.equal(mods[0](x), want)
    else:  # a factored forward rounds differently in bf16
        assert torch.allclose(mods[0](x).float(), want.float(), rtol=0.05, atol=0.05)


def check_reload_packed(out, ids: torch.Tensor, logits: torch.Tensor, packed: dict):
    """compress.load(out) gives the same logits on ids, and the same packed runtime
    modules as `packed` {name: module}: no more, no fewer, every packed buffer equal in
    dtype and value. Returns (loaded model, tokenizer)."""
    import compress
    from compress.nn import PackedLinear

    loaded, tok = compress.load(str(out))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert {n for n, m in loaded.named_modules() if isinstance(m, PackedLinear)} == set(packed)
    for name, m in packed.items():
        new = loaded.get_submodule(name)
        assert type(new) is type(m), name
        for k in m.PACKED:
            a, b = getattr(m, k), getattr(new, k)
            assert (a is None) == (b is None), (name, k)
            assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), (name, k)
    return loaded, tok


def armor_result(seed=4, out=16, d_in=32, b=8):
    """A random ArmorResult: exact 2:4 core, wrappers near the identity (fp16)."""
    from compress.nn.armor_linear import ArmorResult

    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(out, d_in // 4, 4, dtype=torch.bool)
    keep.scatter_(2, torch.rand(out, d_in // 4, 4, generator=g).topk(2, -1).indices, True)
    core = torch.randn(out, d_in, generator=g) * keep.reshape(out, d_in)
    A = torch.eye(b) + 0.1 * torch.randn(out // b, b, b, generator=g)
    B = torch.eye(b) + 0.1 * torch.randn(d_in // b, b, b, generator=g)
    return ArmorResult(A.half(), B.half(), core.half(), keep.reshape(out, d_in))
