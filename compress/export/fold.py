"""Folding: a runtime module a serving format cannot express becomes a dense nn.Linear
of its effective weight, or, unless the user asked for that, an error naming it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from compress.errors import CompressError
from compress.nn.base import PackedLinear

log = logging.getLogger(__name__)


def fold_packed(model: nn.Module, dtype: torch.dtype, keep: tuple = (), why: str = "", fold: bool = True,
                experts_of: tuple = ()) -> list:
    """Replace every runtime module (PackedLinear) not of a class in `keep` by a dense
    nn.Linear of its effective weight. With fold=False such a module is an error that
    names it and says `why` the format cannot hold it. Packed experts stay when
    PackedExperts is kept, or when each expert module is of a class in `experts_of` or
    dense. Returns the folded names."""
    from compress.nn import PackedExperts

    folded = []
    for name, m in list(model.named_modules()):
        stays = PackedExperts in keep or isinstance(m, PackedExperts) and all(
            isinstance(m.expert(e, p), experts_of + (nn.Linear,)) for e in range(m.num) for p in m.projs)
        if isinstance(m, PackedExperts) and not stays:   # the model's own fused experts again
            if not fold:
                raise CompressError(f"export: {name} holds packed experts, which {why}; "
                                    "pass fold: true (--fold) to store their effective weights densely")
            model.set_submodule(name, m.to_fused(dtype))
            folded.append(name)
        elif isinstance(m, PackedLinear) and not isinstance(m, keep) and not _inside(folded, name):
            if not fold:
                raise CompressError(f"export: {name} is a {type(m).__name__}, which {why}; "
                                    "pass fold: true (--fold) to store its effective weight densely")
            model.set_submodule(name, m.to_linear(dtype))
            folded.append(name)
    if folded:
        log.warning("export: %d layers folded into dense %s weights (%s, ...)", len(folded), dtype, folded[0])
    return folded


def _inside(folded: list, name: str) -> bool:
    """Whether `name` lies in a module already folded (a PackedExperts' expert)."""
    return any(name.startswith(f"{f}.") for f in folded)
