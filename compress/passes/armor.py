"""ARMOR: 2:4 pruning as a factorization (Liu et al., ICLR 2026, "ARMOR: High-Performance
Semi-Structured Pruning via Adaptive Matrix Factorization").

Each weight becomes W_hat = A (W' * M) B (`ArmorLinear`): M is an exact 2:4 mask, and A
[out, out] and B [in, in] are block diagonal with b x b blocks. Block coordinate descent
on a layer-wise proxy loss chooses them, in one of two forms:

    diag  L = sum_ij (W - W_hat)_ij^2 h_j   with h = diag(X X^T)  (the paper's NoWag loss)
    full  L = tr((W - W_hat) X X^T (W - W_hat)^T)   (the layer's output error)

Both are divided by their value at W_hat = 0, so they read as relative errors.

Start: A = B = I and a 2:4 core, taken either from the mask and weights an earlier pass
left (for example SparseGPT 2:4), or from NoWag-P. NoWag-P keeps the top 2 of
W_bar^2 * h in every group of 4, where W_bar is W with its rows and then its columns
scaled to unit norm.

Each iteration has two steps.
(a) Continuous: one Adam step on A, B and the kept values of W'.
(b) Discrete: re-solve the core group by group. Changing a group's four values s (row r,
    inputs c..c+3) moves W_hat by a_r (s B_c), so the loss is the quadratic
        L(s) = L_0 - 2 g.s + |a_r|^2 s Q_c s^T.
    Here a_r is column r of A, B_c is rows c..c+3 of B, Q_c = B_c H B_c^T, and
        g = [A^T (E H) B^T]_{r,c} + |a_r|^2 Q_c s_old
    where E = W - W_hat and H = X X^T (diag h for the diag loss). For each of the 6
    two-of-four supports the 2-value least-squares problem is solved in closed form,
    and the best support is kept. Every (A block, B block) pair re-solves its group of
    largest loss drop. Under the diag loss those groups touch disjoint parts of W_hat,
    so all of them update in parallel exactly.

A step that raises the loss is undone, and the best iterate is kept. So the final loss
is at most the loss at the start: the paper's guarantee.

The loop works on the transpose, W^T ~ B^T S^T A^T: a core group (4 consecutive inputs)
is then 4 consecutive rows, so every elementwise op streams contiguous memory (the loop
is memory bound on the CPU), and the gradients are written out by hand (`forward_backward`)
rather than kept in an autograd graph. tests/test_armor.py checks them against autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.errors import CompressError
from compress.kernels.reference import PAIRS   # [6, 2] the two-of-four supports
from compress.masks import nm_mask
from compress.nn.armor_linear import ArmorResult, FACTOR_DTYPE, factor_product
from compress.passes.base import Layer, PassConfig, register

PRESETS = {"default": 100, "fast": 30}                                  # iterations


@dataclass
class ArmorConfig(PassConfig):
    """block_size  b, the side of A's and B's diagonal blocks (divides in and out)
    iters       block coordinate descent iterations (default: from `preset`)
    preset      'default' (100 iterations) or 'fast' (30)
    lr          Adam learning rate of A, B and the core values
    loss        'diag' or 'full' (see the module docstring)
    init        'auto' (the layer's 2:4 mask if an earlier pass left one, else NoWag-P),
                'nowag' or 'mask'
    Every step is deterministic (greedy picks, no sampling), so no seed is needed."""

    block_size: int = 32
    iters: Optional[int] = None
    preset: str = "default"
    lr: float = 1e-2
    loss: str = "diag"
    init: str = "auto"

    packs = True

    @property
    def needs_xtx(self) -> bool:
        return self.loss == "full"

    @property
    def n_iters(self) -> int:
        return PRESETS[self.preset] if self.iters is None else self.iters

    def validate(self) -> None:
        super().validate()
        n = self.name

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not integer(self.block_size) or self.block_size < 4 or self.block_size % 4:
            raise CompressError(f"{n}.block_size: expected a multiple of 4, got {self.block_size!r}")
        if self.iters is not None and (not integer(self.iters) or self.iters < 0):
            raise CompressError(f"{n}.iters: expected an integer >= 0, got {self.iters!r}")
        if self.preset not in PRESETS:
            raise CompressError(f"{n}.preset: expected one of {', '.join(PRESETS)}, got {self.preset!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise CompressError(f"{n}.lr: expected a positive number, got {self.lr!r}")
        if self.loss not in ("diag", "full"):
            raise CompressError(f"{n}.loss: expected 'diag' or 'full', got {self.loss!r}")
        if self.init not in ("auto", "nowag", "mask"):
            raise CompressError(f"{n}.init: expected 'auto', 'nowag' or 'mask', got {self.init!r}")

    def check_layer(self, name: str, out: int, d_in: int) -> None:
        """Refuse, before any work, a layer the factorization cannot tile."""
        b = self.block_size
        for what, d in (("input", d_in), ("output", out)):
            if d % b:
                raise CompressError(f"{self.name}.block_size: {b} does not divide the {what} size {d} of layer {name}")


Armor = ArmorConfig


class ProxyLoss:
    """L(W_hat) / L(0) for the diag or full loss, on the transposed problem: W [in, out]
    (the layer's weight transposed, rows are inputs), H [in, in] (full) or h [in] (diag)."""

    def __init__(self, W: torch.Tensor, H: Optional[torch.Tensor], h: torch.Tensor):
        self.W, self.H, self.h = W, H, h
        self.scale = 1.0                                   # L(0) unscaled, then the scale
        self.scale = 1.0 / max(float(self(torch.zeros_like(W))), 1e-30)

    def times_H(self, E: torch.Tensor) -> torch.Tensor:
        """H E for E [..., in, k]."""
        return torch.matmul(self.H, E) if self.H is not None else E * self.h[:, None]

    def __call__(self, W_hat: torch.Tensor) -> torch.Tensor:
        E = self.W - W_hat
        return (self.times_H(E) * E).sum() * self.scale

    def H_blocks(self, b: int) -> torch.Tensor:
        """The b x b diagonal blocks of H, [in/b, b, b]."""
        if self.H is None:
            return torch.diag_embed(self.h.reshape(-1, b))
        n = self.W.shape[0] // b
        return self.H.reshape(n, b, n, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def start(layer: Layer, cfg: ArmorConfig, W: torch.Tensor, h: torch.Tensor):
    """(core values V [out, in], 2:4 mask M [out, in]) to start from."""
    cur = layer.W
    groups = (cur != 0).reshape(cur.shape[0], -1, 4).sum(-1)
    has_mask = bool((groups <= 2).all()) and bool((cur == 0).any())
    if cfg.init == "mask" and not has_mask:
        raise CompressError(f"{cfg.name}.init: layer {layer.name} has no 2:4 mask from an earlier pass "
                            "(put a 2:4 pruning pass first, or use init: nowag)")
    score = nowag_score(W, h)
    if cfg.init == "nowag" or not has_mask:
        M = nm_mask(score, 2, 4)
        return W * M, M
    M = nm_mask(torch.where(cur != 0, 1.0 + score, score), 2, 4)   # the earlier mask, completed to 2 per group
    return cur * M, M


def nowag_score(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NoWag-P's score W_bar^2 h (W_bar: rows, then columns, scaled to unit norm), scaled
    into [0, 1]; its top 2 per group of 4 is the NoWag-P mask."""
    Wb = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Wb = Wb / Wb.norm(dim=0, keepdim=True).clamp_min(1e-12)
    s = Wb.square() * h
    return s / s.max().clamp_min(1e-30)


def group_Q(Bt: torch.Tensor, loss: ProxyLoss, b: int) -> torch.Tensor:
    """Q_c = B_c H B_c^T for every group c of 4 core inputs, [in/4, 4, 4] (B_c: rows
    c..c+3 of blockdiag(B), nonzero only in one block, so only H's diagonal blocks enter).
    Bt [in/b, b, b] holds the blocks of B^T."""
    nB, gpb = Bt.shape[0], b // 4
    BHB = Bt.transpose(1, 2) @ loss.H_blocks(b) @ Bt                                 # [nB, b, b]
    Q = BHB.reshape(nB, gpb, 4, gpb, 4).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(-1, 4, 4)
    return Q + 1e-6 * Q.diagonal(dim1=1, dim2=2).mean() * torch.eye(4, device=Q.device)


def best_value(g: torch.Tensor, Qi: torch.Tensor) -> torch.Tensor:
    """max over the 6 supports (p, q) of every group of g_S^T Q_S^-1 g_S: g [in/4, 4, out]
    (group c's four entries for output r at g[c, :, r]), Qi [in/4, 6, 2, 2] the inverses of
    Q restricted to each support; returns [in/4, out]. Support by support on contiguous
    [in/4, out] planes with a running max, so every op streams memory once (which support
    wins is asked only of the picked groups: `best_support`)."""
    a, b2, c = (x.T[..., None] for x in (Qi[..., 0, 0], 2 * Qi[..., 0, 1], Qi[..., 1, 1]))   # [6, in/4, 1]
    gs = g.unbind(1)                                                            # 4 x [in/4, out]
    sq = [x * x for x in gs]
    best = None
    for j, (p, q) in enumerate(PAIRS.tolist()):
        v = torch.addcmul(torch.addcmul(sq[p] * a[j], sq[q], c[j]), gs[p] * gs[q], b2[j])   # [in/4, out]
        best = v if best is None else torch.maximum(best, v, out=best)
    return best


def best_support(g: torch.Tensor, Qi: torch.Tensor) -> torch.Tensor:
    """The support (0..5, an index into PAIRS) of largest g_S^T Q_S^-1 g_S for each of n
    groups: g [n, 4], Qi [n, 6, 2, 2]. Ties go to the first support."""
    gS = g[:, PAIRS.to(g.device)]                                               # [n, 6, 2]
    return (gS[..., None, :] @ Qi @ gS[..., None])[..., 0, 0].argmax(-1)


def forward_backward(loss: ProxyLoss, Wc: torch.Tensor, Bt: torch.Tensor, S: torch.Tensor, At: torch.Tensor):
    """The loss at W_hat^T = B^T S^T A^T and its gradients, by hand (transposed problem).
    Wc [out/b, in, b]: W^T's column blocks; Bt [in/b, b, b], At [out/b, b, b]: the blocks of
    B^T and A^T; S [in, out]: the core S^T. Returns (L, G, dL/dBt, dL/dAt) with
    G = B (H E) A [in, out], so that dL/dS = -2 scale G (E = W^T - W_hat^T)."""
    d_in, out = S.shape
    nB, b, nA = Bt.shape[0], Bt.shape[1], At.shape[0]
    BS = torch.bmm(Bt, S.view(nB, b, out)).view(d_in, out)                     # B^T S^T, rows
    BS_c = BS.view(d_in, nA, b).transpose(0, 1)                                 # its column blocks (a view)
    E = torch.baddbmm(Wc, BS_c, At, alpha=-1)                                   # E, column blocks [nA, in, b]
    R = loss.times_H(E)                                                         # H E
    L = torch.dot(E.view(-1), R.view(-1)) * loss.scale
    RA = torch.bmm(R, At.transpose(1, 2)).transpose(0, 1).reshape(d_in, out)    # (H E) A, rows (one copy)
    G = torch.bmm(Bt.transpose(1, 2), RA.view(nB, b, out)).view(d_in, out)      # B (H E) A
    c = -2 * loss.scale
    dBt = torch.bmm(RA.view(nB, b, out), S.view(nB, b, out).transpose(1, 2)).mul_(c)   # blocks of (H E) A S
    dAt = torch.bmm(BS_c.transpose(1, 2), R).mul_(c)                                   # blocks of S B (H E)
    return L, G, dBt, dAt


@torch.no_grad()
def discrete_step(Bt, At, V, M, G, loss: ProxyLoss, b: int, before: float, S=None) -> int:
    """Re-solve the core group of largest loss drop in every (A block, B block) pair,
    over the 6 supports, on the transposed problem: V, M [in, out] the core values and
    mask transposed, G = B (H E) A [in, out] (forward_backward), `before` the current
    loss, S = V * M if the caller has it. Edits V, M (bool or float) in place; returns the
    number of groups changed. Undone if the loss rises (full loss only: there groups in one
    output interact)."""
    d_in, out = V.shape
    nA, nB, gpb = out // b, d_in // b, b // 4
    s_old = (V * M.to(V.dtype) if S is None else S).view(-1, 4, out)            # groups [in/4, 4, out]
    Q = group_Q(Bt, loss, b)                                                    # [in/4, 4, 4]
    an = At.square().sum(2).reshape(out).clamp_min(1e-12)                       # |a_r|^2 (column r of A)  [out]
    qs = torch.bmm(Q, s_old).mul_(an)                                           # |a_r|^2 Q_c s_old
    g = G.view(-1, 4, out) + qs                                                 # [in/4, 4, out]
    current = (g + G.view(-1, 4, out)).mul_(s_old).sum(1)                       # 2 g.s - |a_r|^2 s Q s  [in/4, out]
    pairs = PAIRS.to(V.device)
    Qi = torch.linalg.inv(Q[:, pairs[:, :, None], pairs[:, None, :]])          # [in/4, 6, 2, 2]
    gain = best_value(g, Qi).div_(an).sub_(current)                                         # [in/4, out]
    gain = gain.view(nB, gpb, nA, b).permute(0, 2, 1, 3).reshape(nB, nA, gpb * b)
    best, pick = gain.max(-1)                                                   # [nB, nA]
    kB, jA = torch.meshgrid(torch.arange(nB, device=V.device), torch.arange(nA, device=V.device), indexing="ij")
    r = (jA * b + pick % b)[best > 0]                                           # output
    c = (kB * gpb + pick // b)[best > 0]                                        # group along the input
    if r.numel() == 0:
        return 0
    gc = g[c, :, r]                                                             # the picked groups [n, 4]
    kk = best_support(gc, Qi[c])
    sS = (Qi[c, kk] @ gc.gather(1, pairs[kk])[..., None])[..., 0] / an[r, None]             # [n, 2]
    new = torch.zeros(r.numel(), 4, device=V.device).scatter_(1, pairs[kk], sS)
    support = torch.zeros(r.numel(), 4, dtype=torch.bool, device=V.device).scatter_(1, pairs[kk], True)
    rows = c[:, None] * 4 + torch.arange(4, device=V.device)                    # [n, 4] inputs
    old_V, old_M = V[rows, r[:, None]], M[rows, r[:, None]]
    V[rows, r[:, None]], M[rows, r[:, None]] = new, support.to(M.dtype)
    if loss.H is not None and loss(factor_product(Bt, V * M.to(V.dtype), At)) > before:
        V[rows, r[:, None]], M[rows, r[:, None]] = old_V, old_M
        return 0
    return int(r.numel())


@register("armor", ArmorConfig)
@torch.no_grad()
def armor(layer: Layer, cfg: ArmorConfig) -> None:
    W = layer.W_dense.to(layer.W.device).float()                  # the target is the dense weight
    out, d_in = W.shape
    cfg.check_layer(layer.name, out, d_in)
    b, dev = cfg.block_size, W.device
    st = layer.stats
    h = (st.sumsq * (2.0 / max(st.n, 1))).float().to(dev)         # diag(H), H = (2/n) X^T X
    V, M = start(layer, cfg, W, h)
    eye = lambda n: torch.eye(b, device=dev).repeat(n, 1, 1)  # noqa: E731  [n, b, b] identity blocks
    start_res = ArmorResult(eye(out // b).to(FACTOR_DTYPE), eye(d_in // b).to(FACTOR_DTYPE), V.to(FACTOR_DTYPE), M.clone())
    Wt = W.T.contiguous()                                         # the transposed problem (module docstring)
    loss = ProxyLoss(Wt, st.hessian().to(dev) if cfg.loss == "full" else None, h)
    Wc = Wt.view(d_in, out // b, b).transpose(0, 1).contiguous()  # W^T's column blocks [out/b, in, b]
    Bt, At = eye(d_in // b).requires_grad_(True), eye(out // b).requires_grad_(True)
    Vt, Mt = V.T.contiguous().requires_grad_(True), M.T.to(V.dtype).contiguous()   # a float mask: x * (bool M) is slow
    opt = torch.optim.Adam([Bt, At, Vt], lr=cfg.lr, fused=dev.type in ("cpu", "cuda") or None)
    best_loss, best, swaps = float("inf"), None, 0
    for it in range(cfg.n_iters + 1):
        S = Vt * Mt                                               # S^T [in, out]
        L, G, Bt.grad, At.grad = forward_backward(loss, Wc, Bt, S, At)
        if L.item() < best_loss:
            best_loss, best = L.item(), (Bt.clone(), At.clone(), S, Mt.clone())
        if it == cfg.n_iters:
            break
        Vt.grad = (G * Mt).mul_(-2 * loss.scale)                  # dL/dV at this point's mask
        # (b) then (a), both from this point's gradient
        swaps += discrete_step(Bt, At, Vt, Mt, G, loss, b, L.item(), S)
        opt.step()
    Bt, At, S, Mt = best
    A, B, core = (t.to(FACTOR_DTYPE).contiguous() for t in (At.transpose(1, 2), Bt.transpose(1, 2), S.T))
    res = ArmorResult(A, B, core, Mt.T > 0)
    W0, W1 = start_res.dequantize(), res.dequantize()
    l0, l1 = float(loss(W0.T)), float(loss(W1.T))
    if l1 > l0:                                                    # never worse than the start
        res, W1, l1 = start_res, W0, l0
    layer.packed = res
    layer.W.copy_(W1)
    layer.info.update(armor_loss=[l0, l1], armor_core_updates=swaps,
                      armor_extra_params_pct=round(100 * (res.A.numel() + res.B.numel()) / (out * d_in), 3))
