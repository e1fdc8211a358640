"""Linear algebra shared by the second-order passes (SparseGPT now, GPTQ later)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def handle_dead_inputs(H: torch.Tensor, W: torch.Tensor) -> int:
    """Inputs that were always zero (H_jj = 0) carry no information: their weights are
    set to zero and H_jj to 1 so that H stays invertible. Edits H [in, in] and W
    [out, in] in place; returns the number of dead inputs."""
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    return int(dead.sum())


def inverse_cholesky(H: torch.Tensor, percdamp: float, layer_name: str, info: dict,
                     retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1, with lambda = percdamp * mean(diag H).

    U^T U = H^-1; row i of U holds the OBS update direction for column i once columns
    < i are fixed (SparseGPT Sec. 3.2, GPTQ Sec. 4 "Cholesky reformulation"). When the
    factorization fails the damping grows tenfold and the retry is logged and recorded
    in `info` (report.json)."""
    mean_diag = H.diagonal().mean()
    damp = percdamp
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, bad = torch.linalg.cholesky_ex(Hd)
        if not bad:
            U, bad = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not bad:
                info["percdamp"] = damp
                if attempt:
                    info["cholesky_retries"] = attempt
                return U
        log.warning("%s: Cholesky failed at percdamp=%g; retrying with %g", layer_name, damp, damp * 10)
        damp *= 10
    raise FloatingPointError(f"{layer_name}: Cholesky factorization failed even at percdamp={damp / 10:g}")
