"""ARMOR's iteration, phase by phase (issue 26): the autograd form the pass used before
(autograd forward and backward on W_hat = A S B, unfused Adam, the discrete step on the
[out, in] layout) beside the current one (the transposed problem, gradients by hand,
fused Adam; compress/passes/armor.py), on random weights of SmolLM2's seven layer shapes
with correlated inputs (tests/helpers.py), SparseGPT 2:4 start, block 32, diag loss.

Prints, per layer shape, milliseconds per iteration of each phase and the final proxy
loss after ITERS iterations of each, then the sum over one SmolLM2 block. Timed with the
threads torch has (2 on this machine); run it with nothing else running.

    python benchmarks/armor_loop.py [--iters 100]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from compress.nn.armor_linear import factor_product  # noqa: E402
from compress.passes import armor as ar  # noqa: E402
from compress.passes.base import Layer, make_config, pass_fn  # noqa: E402
from helpers import correlated_inputs, stats_of  # noqa: E402

SHAPES = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
          ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536)]
B = 32


class Clock(dict):
    def __call__(self, phase, t0):
        t = time.perf_counter()
        self[phase] = self.get(phase, 0.0) + t - t0
        return t


def autograd_loop(W, V, M, h, n):
    """The slow twin: the [out, in] problem under autograd. Its discrete step is the
    current one, fed the transposes (it is the same math)."""
    out, d_in = W.shape
    loss_t = ar.ProxyLoss(W.T.contiguous(), None, h)
    eye = lambda k: torch.eye(B).repeat(k, 1, 1)  # noqa: E731
    A, Bf = eye(out // B).requires_grad_(True), eye(d_in // B).requires_grad_(True)
    V = V.clone().requires_grad_(True)
    opt = torch.optim.Adam([A, Bf, V], lr=1e-2)
    clock, best = Clock(), float("inf")
    for _ in range(n + 1):
        t = time.perf_counter()
        S = V * M
        S.retain_grad()
        E = W - factor_product(A, S, Bf)
        L = (E * h * E).sum() * loss_t.scale
        best = min(best, L.item())
        opt.zero_grad(set_to_none=True)
        L.backward()
        t = clock("forward + backward", t)
        G = (S.grad / (-2 * loss_t.scale)).T.contiguous()
        Vt, Mt = V.detach().T.contiguous(), M.T.contiguous()
        ar.discrete_step(Bf.detach().transpose(1, 2), A.detach().transpose(1, 2), Vt, Mt, G, loss_t, B, L.item())
        V.data.copy_(Vt.T)
        M.copy_(Mt.T)
        t = clock("discrete step", t)
        opt.step()
        clock("Adam", t)
    return clock, best


def layer_case(out, d_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(2048, d_in, seed=seed + 1)
    W = torch.randn(out, d_in, generator=g) / d_in ** 0.5
    layer = Layer("x", W.clone(), W.clone(), stats_of(X))
    sg = make_config("sparsegpt", {"pattern": "2:4"})
    pass_fn(sg)(layer, sg)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    rows, total = [], {"autograd": 0.0, "current": 0.0}
    warm = layer_case(64, 64)                              # warm up linalg and both Adam kernels
    h = (warm.stats.sumsq * (2.0 / warm.stats.n)).float()
    autograd_loop(warm.W_dense, *(t.float() for t in ar.start(warm, make_config("armor", {}), warm.W_dense, h)), h, 2)
    pass_fn(make_config("armor", {"iters": 2}))(warm, make_config("armor", {"iters": 2}))
    for i, (name, out, d_in) in enumerate(SHAPES):
        layer = layer_case(out, d_in, seed=i)
        h = (layer.stats.sumsq * (2.0 / layer.stats.n)).float()
        V, M = ar.start(layer, make_config("armor", {}), layer.W_dense, h)
        clock, best = autograd_loop(layer.W_dense, V, M.float(), h, args.iters)
        t0 = time.perf_counter()
        cfg = make_config("armor", {"block_size": B, "iters": args.iters})
        pass_fn(cfg)(layer, cfg)
        new = time.perf_counter() - t0
        old = sum(clock.values())
        total["autograd"] += old
        total["current"] += new
        ms = {k: 1e3 * v / args.iters for k, v in clock.items()}
        rows.append((f"{name} {out}x{d_in}", ms, 1e3 * old / args.iters, 1e3 * new / args.iters, best,
                     layer.info["armor_loss"][1]))
    print(f"ARMOR iteration, ms per iteration ({args.iters} iterations, {torch.get_num_threads()} threads)\n")
    print("| layer | autograd: fwd + bwd | discrete | Adam | autograd total | current total | speed-up "
          "| final loss autograd | final loss current |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, ms, old, new, l_old, l_new in rows:
        print(f"| {label} | {ms['forward + backward']:.2f} | {ms['discrete step']:.2f} | {ms['Adam']:.2f} | {old:.2f} "
              f"| {new:.2f} | {old / new:.2f}x | {l_old:.5f} | {l_new:.5f} |")
    print(f"\none SmolLM2 block: autograd {total['autograd']:.2f} s, current {total['current']:.2f} s "
          f"({total['autograd'] / total['current']:.2f}x); x30 blocks: {30 * total['autograd']:.0f} s against "
          f"{30 * total['current']:.0f} s")


if __name__ == "__main__":
    main()
