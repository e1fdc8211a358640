"""What every decoder block receives from the model, captured in one cheap pass.

transformers builds each layer's inputs by that layer's type (`config.layer_types`):
Gemma 2/3, gpt-oss, Cohere2 and Qwen2/3 with sliding layers hand a sliding-window mask
to some blocks and the full causal mask to others, and Gemma 3 gives local and global
layers rotary tables of different bases. So the runner replays each block with the
arguments the model gives *that* block, never block 0's.

The capture runs the model once per calibration batch with every block's `forward`
replaced by a catcher. A catcher records its arguments and returns its input unchanged,
so the model builds masks and rotary tables exactly as it normally would, and no block
computes anything (an offloaded block, still on the meta device, is never read).

A catcher must return what the model's loop expects from a block: the hidden states
themselves (most transformers 5 models) or a tuple with them first (Falcon-H1, Bloom).
Each catcher starts by returning the tensor; the next catcher checks that it received
that very tensor. When it received something else (the loop took `output[0]`), the
batch is replayed with a 1-tuple from that block. A loop that still changes the hidden
states between two blocks is refused: replaying blocks one by one would not be the
model's forward.

    hidden[b]         [batch, seq, d_model]  the next block's input for batch b
    args[i][b]        block i's positional arguments after the hidden states
    kwargs[i][b]      block i's keyword arguments (masks, rotary tables, position ids)

Tensors the model shares between blocks (one mask and one (cos, sin) pair per layer
type) are stored once per batch, so memory stays that of block 0's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from compress.errors import CompressError


@dataclass
class BlockInput:
    """One block's view of one calibration batch: the hidden states and every other
    positional and keyword argument the model passes that block."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass
class CalibInputs:
    """Per-batch hidden states and per-block, per-batch arguments (module docstring)."""

    hidden: list = field(default_factory=list)
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)
    reached: list = field(default_factory=list)   # reached[i]: the model calls block i on text

    def __bool__(self) -> bool:
        return bool(self.hidden)

    def block(self, i: int) -> list[BlockInput]:
        """Block i's inputs, one per batch, reading the current hidden states."""
        return [BlockInput(h, self.args[i][b], self.kwargs[i][b]) for b, h in enumerate(self.hidden)]


def forward_block(block, inp: BlockInput, device) -> torch.Tensor:
    """The block's hidden-state output on one calibration batch (the first element when
    the block returns a tuple). Gradients follow the caller's mode: the runner calls it
    under no_grad, block passes (BQPO) train through it."""
    out = block(inp.hidden.to(device), *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """The last block was reached: nothing after it is needed."""


class _Retry(Exception):
    """A catcher returned the wrong container; replay the batch."""


class _Interner:
    """Casts and moves a batch's argument tensors, once per distinct tensor object, so
    that what the model shares between blocks stays shared."""

    def __init__(self, dtype: Optional[torch.dtype], device):
        self.dtype, self.device = dtype, device
        self.memo: dict[int, tuple] = {}   # id -> (original, converted): the original keeps the id alive

    def __call__(self, obj):
        hit = self.memo.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        if isinstance(obj, torch.Tensor):
            new = obj.to(self.dtype) if self.dtype is not None and obj.is_floating_point() else obj
            new = new.to(self.device)
        elif isinstance(obj, (tuple, list)):
            new = type(obj)(self(o) for o in obj)
        elif isinstance(obj, dict):
            new = {k: self(v) for k, v in obj.items()}
        else:
            return obj
        self.memo[id(obj)] = (obj, new)
        return new


def _same(received, returned) -> bool:
    return received is returned or (isinstance(received, torch.Tensor) and received.shape == returned.shape
                                    and torch.equal(received, returned))


class _Catchers:
    """Catcher forwards installed on every block for one batch (see the module docstring)."""

    def __init__(self, blocks, tuple_out: list, convert: _Interner, act_device):
        self.blocks, self.tuple_out, self.convert, self.act_device = blocks, tuple_out, convert, act_device
        self.args: dict[int, tuple] = {}
        self.kwargs: dict[int, dict] = {}
        self.hidden = None
        self.last: Optional[tuple[int, torch.Tensor]] = None   # (block, the hidden states it returned)

    def catcher(self, i: int):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i in self.args:
                raise CompressError(f"model: block {i} is called twice in one forward; the runner replays each block once")
            if self.last is None:
                self.hidden = self.convert(hidden).to(self.act_device)
            elif not _same(hidden, self.last[1]):
                j = self.last[0]
                if not self.tuple_out[j]:
                    self.tuple_out[j] = True
                    raise _Retry
                raise CompressError(f"model: the decoder loop changes the hidden states between blocks {j} and {i} "
                                    f"({type(self.blocks[i]).__name__}); blocks cannot be replayed one by one")
            self.args[i], self.kwargs[i] = self.convert(tuple(args[1:])), self.convert(kwargs)
            self.last = (i, hidden)
            if i == len(self.blocks) - 1:
                raise _Stop
            return (hidden,) if self.tuple_out[i] else hidden
        return forward

    def __enter__(self):
        # An instance attribute shadows the class's forward; one already there (a hook
        # wrapper) is put back afterwards.
        self.saved = [b.__dict__.get("forward") for b in self.blocks]
        for i, b in enumerate(self.blocks):
            b.forward = self.catcher(i)
        return self

    def __exit__(self, *exc):
        for b, f in zip(self.blocks, self.saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


@torch.no_grad()
def capture_inputs(model, blocks, ids: torch.LongTensor, batch_size: int, device, act_device,
                   dtype: Optional[torch.dtype] = None) -> CalibInputs:
    """Every block's inputs for each batch of `ids` [n, seq]: hidden states of block 0
    (on `act_device`) and each block's own arguments (on `device`), floating tensors
    cast to the compute `dtype`."""
    out = CalibInputs(args=[[] for _ in blocks], kwargs=[[] for _ in blocks])
    tuple_out = [False] * len(blocks)
    for b in range(0, ids.shape[0], batch_size):
        for _ in range(len(blocks) + 1):   # each replay fixes one block's container
            catch = _Catchers(blocks, tuple_out, _Interner(dtype, device), act_device)
            try:
                with catch:
                    model(ids[b:b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            except _Retry:
                continue
            break
        else:
            raise CompressError(f"model: cannot replay {type(model).__name__}'s blocks one by one")
        if catch.hidden is None:
            raise CompressError(f"model: {type(model).__name__}'s forward on token ids never reached its decoder blocks")
        reached = [i in catch.args for i in range(len(blocks))]
        if out.reached and reached != out.reached:
            raise CompressError("model: the decoder calls different blocks for different calibration batches")
        out.reached = reached
        out.hidden.append(catch.hidden)
        for i in range(len(blocks)):
            out.args[i].append(catch.args.get(i, ()))
            out.kwargs[i].append(catch.kwargs.get(i, {}))
    return out
