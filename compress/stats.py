"""Calibration statistics of one linear layer's input X, accumulated over tokens.

One `InputStats` per *distinct* input tensor: q/k/v (and gate/up) read the same
normalized hidden state, so they share one object and the work is done once.
"""
from __future__ import annotations

from typing import Optional

import torch


class InputStats:
    """Running count, sum, sum of squares, sum of magnitudes and (optionally) X^T X of
    rows x in R^d_in.

    n       number of tokens seen
    sum     [d_in]  sum_t x_t                (fp64: long sums of activations)
    sumsq   [d_in]  sum_t x_t^2              (fp64)
    abssum  [d_in]  sum_t |x_t|              (fp64; AWQ's activation scale)
    xtx     [d_in, d_in] sum_t x_t x_t^T     (fp32; only when a pass needs it)
    """

    abssum: Optional[torch.Tensor] = None   # ExpertStats does not collect it

    def __init__(self, d_in: int, want_xtx: bool, device: torch.device):
        self.n = 0
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.abssum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.xtx: Optional[torch.Tensor] = (
            torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if want_xtx else None)

    # X^T X of bf16 inputs is computed in bf16 (several times faster on CPUs with native
    # bf16 and on GPUs) over chunks of this many tokens, each product rounded once and
    # summed in fp32: relative error ~5e-4 (SmolLM2's activations) instead of ~2e-3 for
    # one rounding of the whole batch. (512 tokens saves ~1 % of a GPTQ run but adds
    # rounding, ~6e-4, enough to reorder SparseGPT and Wanda at 50 % on 16 x 256
    # calibration tokens in tests/test_smollm2.py.) bf16 has fp32's range, so no
    # product overflows. fp16 does not: its largest value is 65504, so one channel with
    # |x| >= 16 over 256 tokens would round to inf; fp16 inputs are multiplied in fp32.
    HALF_CHUNK = 256

    # The moments are summed over chunks of this many tokens in one reused fp32 buffer:
    # whole-batch temporaries (x.float(), x^2, |x|: 25 MB each at 4096 x 1536) land in
    # fresh pages every batch, and the page faults cost more than the arithmetic.
    MOMENT_CHUNK = 1024

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])          # [tokens, d_in]
        self.n += x.shape[0]
        # Per-batch sums in fp32 (fast; the copy into fp32 is exact for bf16 / fp16),
        # accumulated across batches in fp64.
        buf = torch.empty(min(self.MOMENT_CHUNK, x.shape[0]), x.shape[1], dtype=torch.float32, device=x.device)
        s, sq, ab = (torch.zeros(x.shape[1], dtype=torch.float32, device=x.device) for _ in range(3))
        for c in x.split(self.MOMENT_CHUNK):
            b = buf[:c.shape[0]]
            b.copy_(c)
            s += b.sum(0)
            ab += b.abs_().sum(0)
            sq += b.square_().sum(0)
        self.sum += s.double()
        self.sumsq += sq.double()
        self.abssum += ab.double()
        if self.xtx is None:
            return
        if x.dtype == torch.bfloat16:
            self._add_xtx_bf16(x)
        else:
            xf = x.float()
            self.xtx.addmm_(xf.T, xf)

    # X^T X is symmetric. From this width on (the down projection's input, 1536 on
    # SmolLM2) only its tiles on and above the diagonal are multiplied, SYM_TILES x
    # SYM_TILES of them: 6 of 9 products, ~25 % less time there; below it the tiles are
    # too thin for the CPU's matmul to gain. The lower tiles are mirrored once per batch.
    SYM_MIN, SYM_TILES = 1024, 3

    def _add_xtx_bf16(self, x: torch.Tensor) -> None:
        """xtx += x^T x of bf16 x [tokens, d_in] (chunks of HALF_CHUNK tokens)."""
        d = x.shape[1]
        if d < self.SYM_MIN:
            for c in x.split(self.HALF_CHUNK):
                self.xtx += (c.T @ c).float()
            return
        step = -(-d // self.SYM_TILES)
        tiles = [slice(a, min(a + step, d)) for a in range(0, d, step)]
        for c in x.split(self.HALF_CHUNK):
            ct = c.T.contiguous()                                   # [d_in, chunk]: each tile's rows contiguous
            for i, r in enumerate(tiles):
                for col in tiles[i:]:
                    self.xtx[r, col] += (ct[r] @ ct[col].T).float()
        for i, r in enumerate(tiles):
            for col in tiles[i + 1:]:
                self.xtx[col, r] = self.xtx[r, col].T

    # -- derived quantities passes ask for -------------------------------------------
    def count(self, dims: int):
        """max(n, 1), to divide a statistic with `dims` dimensions per expert by
        (ExpertStats: an [E, 1, ...] tensor)."""
        return max(self.n, 1)

    @property
    def mean(self) -> torch.Tensor:
        """E[x_j], [d_in] fp32."""
        return (self.sum / self.count(1)).float()

    @property
    def absmean(self) -> torch.Tensor:
        """E[|x_j|], [d_in] fp32 (AWQ's per-channel activation magnitude)."""
        if self.abssum is None:
            raise RuntimeError("sum |x| is not collected for these statistics")
        return (self.abssum / self.count(1)).float()

    @property
    def var(self) -> torch.Tensor:
        """Var[x_j] (population), [d_in] fp32."""
        m = self.sum / self.count(1)
        return (self.sumsq / self.count(1) - m * m).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over all tokens, [d_in] fp32 (Wanda's activation norm)."""
        return self.sumsq.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = (2/n) X^T X, [d_in, d_in] fp32 (SparseGPT / GPTQ's layer-wise Hessian)."""
        if self.xtx is None:
            raise RuntimeError("X^T X was not collected: the pass must set needs_xtx = True")
        return self.xtx * (2.0 / self.count(2))

    def relative_error(self, W: torch.Tensor, W_hat: torch.Tensor) -> Optional[float]:
        """||(W - W_hat) X||^2 / ||W X||^2 = tr(D X^T X D^T) / tr(W X^T X W^T), or None
        without X^T X. W, W_hat [out, in]."""
        if self.xtx is None:
            return None
        D = (W - W_hat).float()
        num = ((D @ self.xtx) * D).sum()
        den = ((W.float() @ self.xtx) * W.float()).sum()
        return float(num / den) if den > 0 else 0.0


class ExpertStats(InputStats):
    """InputStats of one projection of every expert of a fused MoE module, batched:
    expert e's statistics come from the tokens it saw (all of them, or those routed to
    it: runner.moe_calibration).

    n      [E] int64 tokens each expert saw
    sum    [E, d_in] fp64     sumsq [E, d_in] fp64     xtx [E, d_in, d_in] fp32 (optional)

    `norm`, `mean`, `var` and `hessian()` are those of InputStats with a leading expert
    dimension; `stats[e]` is expert e's own InputStats (views)."""

    def __init__(self, num: int, d_in: int, want_xtx: bool, device):
        self.n = torch.zeros(num, dtype=torch.int64, device=device)
        self.sum = torch.zeros(num, d_in, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(num, d_in, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(num, d_in, d_in, dtype=torch.float32, device=device) if want_xtx else None

    @torch.no_grad()
    def update(self, experts: torch.Tensor, X: torch.Tensor, counts: torch.Tensor) -> None:
        """Add X [n, t, d_in] (in the calibration dtype; rows of tokens an expert did not
        see are zero) to experts [n]; counts [n] is how many tokens each of them saw.
        X^T X of bf16 inputs as InputStats computes it (bf16 products over chunks of
        HALF_CHUNK tokens, summed in fp32); of any other dtype in fp32. Where X is one
        input broadcast to every expert (stride 0: the gate / up inputs of
        moe_calibration 'all'), its statistics are computed once and added to each."""
        self.n.index_add_(0, experts, counts.to(torch.int64))
        shared = X.shape[0] > 1 and X.stride(0) == 0
        moments = self._moments(X[:1] if shared else X)                  # each [1 or n, ...]
        for mine, add in zip((self.sum, self.sumsq, self.xtx), moments):
            if mine is not None:
                mine.index_add_(0, experts, add.expand(X.shape[0], *add.shape[1:]))

    def _moments(self, X: torch.Tensor) -> tuple:
        """sum [n, d_in] fp64, sum of squares [n, d_in] fp64, X^T X [n, d_in, d_in] fp32
        (None unless collected) of X [n, t, d_in]."""
        Xf = X.float()
        xtx = None
        if self.xtx is not None and X.dtype == torch.bfloat16:
            xtx = sum((c.transpose(1, 2) @ c).float() for c in X.split(self.HALF_CHUNK, dim=1))
        elif self.xtx is not None:
            xtx = Xf.transpose(1, 2) @ Xf
        return Xf.sum(1).double(), Xf.square().sum(1).double(), xtx

    def __len__(self) -> int:
        return self.n.shape[0]

    def __getitem__(self, e: int) -> InputStats:
        one = InputStats.__new__(InputStats)
        one.n, one.sum, one.sumsq = int(self.n[e]), self.sum[e], self.sumsq[e]
        one.xtx = None if self.xtx is None else self.xtx[e]
        return one

    def take(self, idx: list) -> "ExpertStats":
        """The statistics of experts `idx` (a copy)."""
        out = ExpertStats.__new__(ExpertStats)
        out.n, out.sum, out.sumsq = self.n[idx], self.sum[idx], self.sumsq[idx]
        out.xtx = None if self.xtx is None else self.xtx[idx]
        return out

    def data_free(self, rare: torch.Tensor) -> "ExpertStats":
        """A copy in which the experts `rare` [E] bool have the statistics of white
        inputs (mean 0, variance 1, X^T X = n I): on them Wanda ranks |W| (magnitude),
        SparseGPT's OBS update and GPTQ's error feedback vanish (magnitude, RTN)."""
        out = self.take(list(range(len(self))))
        d = self.sum.shape[1]
        n = torch.where(rare, torch.full_like(out.n, d), out.n)
        out.n = n
        out.sum[rare] = 0
        out.sumsq[rare] = n[rare, None].double()
        if out.xtx is not None:
            out.xtx[rare] = torch.eye(d, device=out.xtx.device) * n[rare, None, None].float()
        return out

    def count(self, dims: int) -> torch.Tensor:
        return self.n.clamp_min(1).float().reshape(-1, *[1] * dims)

    def relative_error(self, W: torch.Tensor, W_hat: torch.Tensor) -> Optional[list]:
        """InputStats.relative_error per expert, W / W_hat [E, out, in]."""
        return None if self.xtx is None else [self[e].relative_error(W[e], W_hat[e]) for e in range(len(self))]
