"""Linear algebra shared by the second-order passes (SparseGPT now, GPTQ later)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def handle_dead_inputs(H: torch.Tensor, W: torch.Tensor):
    """Inputs that were always zero (H_jj = 0) carry no information: their weights are
    set to zero and H_jj to 1 so that H stays invertible. Edits H [in, in] and W
    [out, in] in place (or a batch of experts: [E, in, in], [E, out, in]); returns the
    number of dead inputs (a list, one per expert, for a batch)."""
    diag = H.diagonal(dim1=-2, dim2=-1)                  # [..., in] view
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(-2), 0.0)
    return dead.sum(-1).tolist()


def inverse_cholesky(H: torch.Tensor, percdamp: float, layer_name: str, info: dict,
                     retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1, with lambda = percdamp * mean(diag H).

    U^T U = H^-1; row i of U holds the OBS update direction for column i once columns
    < i are fixed (SparseGPT Sec. 3.2, GPTQ Sec. 4 "Cholesky reformulation"). When the
    factorization fails the damping grows tenfold and the retry is logged and recorded
    in `info` (report.json). H may be a batch of experts [E, in, in]: all are factored
    at once, and only the ones that fail are retried, with their own damping."""
    single = H.dim() == 2
    Hb = H.unsqueeze(0) if single else H                               # [E, in, in]
    mean_diag = Hb.diagonal(dim1=-2, dim2=-1).mean(-1)                 # [E]
    tries = torch.zeros_like(mean_diag, dtype=torch.long)
    U = torch.empty_like(Hb)
    todo = torch.ones_like(mean_diag, dtype=torch.bool)
    for _ in range(retries + 1):
        # percdamp * 10^tries in Python floats, then rounded once: tenfold steps in fp32
        # would drift (0.01 * 10 = 0.099999994), and the damping must be the one reported.
        damp = torch.tensor([percdamp * 10 ** t for t in tries.tolist()], dtype=mean_diag.dtype,
                            device=mean_diag.device)
        rows = todo.nonzero().flatten()
        Hd = Hb[rows]
        Hd.diagonal(dim1=-2, dim2=-1).add_((damp * mean_diag)[rows, None])
        L, bad = torch.linalg.cholesky_ex(Hd)
        ok = bad == 0
        good = rows[ok]
        if len(good):   # all succeeded (the usual case): L itself, no copy of it
            Ui, bad2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L if bool(ok.all()) else L[ok]), upper=True)
            done = good[bad2 == 0]
            if len(done) == len(Hb):
                U = Ui
            else:
                U[done] = Ui[bad2 == 0]
            todo[done] = False
        if not todo.any():
            break
        log.warning("%s: Cholesky failed at percdamp=%s; retrying with ten times more", layer_name, _fmt(damp[todo]))
        tries = tries + todo.long()
    else:
        raise FloatingPointError(f"{layer_name}: Cholesky factorization failed even at percdamp={_fmt(damp[todo])}")
    used = [percdamp * 10 ** t for t in tries.tolist()]   # as given, not rounded to fp32
    info["percdamp"] = used[0] if single else used
    if bool((tries > 0).any()):
        info["cholesky_retries"] = tries[0].item() if single else tries.tolist()
    return U[0] if single else U


def _fmt(t: torch.Tensor) -> str:
    return ", ".join(f"{v:g}" for v in t.flatten().tolist()[:4])


SUB_BLOCK = 32   # columns whose updates are applied one by one; the rest of a block lazily


def sub_blocks(b: int, unit: int = 1) -> list[tuple[int, int]]:
    """The [k1, k2) sub-blocks of a block of b columns (SparseGPT / GPTQ, Sec. 3.3's lazy
    batch updates, applied once more inside the block): within a sub-block each column's
    error updates the columns up to k2 at once (rank 1, memory-bound); after it, the
    sub-block's errors update the rest of the block in one matmul. Mathematically the
    same weights; 4x less memory traffic for b = 128. `unit`: columns read together
    before their update (an N:M group, a GPTQ group fitted in the loop), which must lie
    in one sub-block or begin one."""
    if unit <= SUB_BLOCK:
        S = SUB_BLOCK // unit * unit
    else:
        S = SUB_BLOCK if unit % SUB_BLOCK == 0 else unit
    return [(k1, min(k1 + S, b)) for k1 in range(0, b, S)]
