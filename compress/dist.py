"""Many processes, one compression: the torch.distributed side of the runner.

`torchrun --nproc-per-node N -m compress run RECIPE` (or `accelerate launch`) starts N
copies of the run; each reads RANK / WORLD_SIZE / MASTER_ADDR from its environment and
joins one process group (NCCL on GPUs, gloo on CPUs; torchrun's rendezvous makes it
multi-node). The runner then splits the work two ways:

- data: rank r captures and propagates the calibration samples r, r + N, r + 2N, ...
  (`shard`), and every statistic is summed over the ranks before a pass reads it
  (`all_sum`: gathered, then added in rank order, so a run is reproducible);
- layers: each block's layers (each expert of a fused MoE projection) are dealt to the
  ranks by estimated cost (`assign`); a rank compresses its share and broadcasts the
  results (`broadcast`), so every rank holds the same compressed block.

Every collective has a timeout (COMPRESS_DIST_TIMEOUT seconds, default 1800): a rank
that dies or stalls makes the others stop with one line instead of hanging. Outside a
process group every function here is the one-process identity.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import datetime
import hashlib
import heapq
import os
from typing import Callable

import torch
import torch.distributed as td

from compress.errors import CompressError

# Bytes this process sent into all-sums and broadcasts (benchmarks/distributed.py reads them).
TRAFFIC = {"reduced": 0, "broadcast": 0}


def timeout_s() -> float:
    raw = os.environ.get("COMPRESS_DIST_TIMEOUT", "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise CompressError(f"COMPRESS_DIST_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def init(device=None) -> bool:
    """Join the launcher's process group unless one exists: NCCL when the run's device
    (None: cuda if present, as compress.runner.resolve picks it) is a GPU, else gloo.
    Returns whether this call created it."""
    if not launched() or (td.is_available() and td.is_initialized()):
        return False
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise CompressError(f"distributed: could not join the process group ({_first_line(e)})") from None
    # A group still alive when the interpreter exits lets gloo's threads be torn down as
    # C++ statics die, which aborts the process now and then ("terminate called without
    # an active exception"): the Python API leaves the group up for the process's life,
    # so leave it cleanly at exit.
    atexit.register(close, True)
    return True


def close(created: bool) -> None:
    if created and td.is_initialized():
        td.destroy_process_group()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _collective(what: str, fn: Callable):
    """Run one collective; a peer that died or timed out becomes one line."""
    try:
        return fn()
    except (RuntimeError, td.DistBackendError) as e:
        raise CompressError(f"distributed: {what} failed on rank {rank()} of {world_size()}: another process "
                            f"stopped or did not answer within COMPRESS_DIST_TIMEOUT = {timeout_s():g} s "
                            f"({_first_line(e)})") from None


def shard(n: int) -> list[int]:
    """This rank's calibration sample indices: r, r + N, ... (a fixed function of the
    index, so the union over ranks is exactly range(n))."""
    return list(range(rank(), n, world_size()))


def check_same(what: str, text: str) -> None:
    """Refuse a run whose ranks disagree on `what` (compared by SHA-256 of `text`)."""
    if not active():
        return
    mine = hashlib.sha256(text.encode()).hexdigest()
    every: list = [None] * world_size()
    _collective(f"comparing the {what}", lambda: td.all_gather_object(every, mine))
    if len(set(every)) > 1:
        odd = [r for r, h in enumerate(every) if h != every[0]]
        raise CompressError(f"distributed: the {what} differs between processes (rank 0 against rank "
                            f"{', '.join(map(str, odd))}); every process must run the same recipe and data")


def all_sum(tensors: list[torch.Tensor], what: str = "statistics") -> None:
    """Replace each tensor by its sum over the ranks, in place. The ranks' values are
    gathered and added in rank order (0 + 1 + ... + N-1), so the result does not depend
    on the backend's reduction tree and every rank holds the same bits."""
    if not active():
        return
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        _collective(f"summing the {what}", lambda: td.all_gather(parts, t.contiguous()))
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)
        TRAFFIC["reduced"] += t.numel() * t.element_size()


def barrier(what: str) -> None:
    if active():
        _collective(what, td.barrier)


def broadcast_tensor(t: torch.Tensor, src: int, what: str) -> None:
    """Rank `src`'s `t` on every rank (in place; same shape and dtype everywhere)."""
    if not active():
        return
    buf = t.contiguous()
    _collective(f"broadcasting {what}", lambda: td.broadcast(buf, src))
    if buf is not t:
        t.copy_(buf)
    if rank() == src:
        TRAFFIC["broadcast"] += t.numel() * t.element_size()


def broadcast_object(obj, src: int, what: str):
    """Rank `src`'s picklable `obj` (its tensors moved to the CPU) on every rank."""
    if not active():
        return obj
    box = [to_device(obj, torch.device("cpu")) if rank() == src else None]
    _collective(f"broadcasting {what}", lambda: td.broadcast_object_list(box, src))
    return box[0]


def to_device(obj, device: torch.device):
    """`obj` with every tensor inside it (dicts, lists, tuples, dataclass fields: the
    packed results of quant, GQSA, ARMOR) moved to `device`; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):   # a named tuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(out, f.name, to_device(getattr(obj, f.name), device))   # frozen ones too
        return out
    return obj


def assign(costs: dict, size: int) -> dict:
    """{unit: rank}: the units dealt to `size` ranks, largest cost first, each to the
    rank with the least work so far (lowest rank on a tie): the LPT rule, within 4/3
    of the best balance. Units keep their order for ties, so every rank computes the
    same deal."""
    load = [(0.0, r) for r in range(size)]
    out = {}
    for unit in sorted(costs, key=lambda u: -costs[u]):   # stable: equal costs in order
        work, r = heapq.heappop(load)
        out[unit] = r
        heapq.heappush(load, (work + costs[unit], r))
    return out
