"""What every pass shares: the config base class, the per-layer view a pass works on,
the registry, the block context of block passes, and the pruning configs' pattern rules
(the mask math itself is compress.masks).

A pass is a config dataclass plus one function `fn(layer, cfg)` that does the math on a
single linear layer (rule 2 of the developers' guide). The runner builds the `Layer`,
calls the function, and writes `layer.W` back into the model.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from compress.errors import CompressError
from compress.stats import InputStats


@dataclass
class PassConfig:
    """Base of every pass config. Subclasses are dataclasses whose fields are the
    pass's YAML arguments. `targets` / `ignore` are regular expressions on the
    linear layer's qualified name (e.g. ``model.layers.3.mlp.down_proj``)."""

    targets: list = field(default_factory=lambda: [r".*"])
    ignore: list = field(default_factory=list)

    # Which statistics the pass needs from the runner (class-level, not YAML fields).
    needs_stats = True  # per-input count / sum / sum of squares
    needs_xtx = False   # the full X^T X in fp32 (SparseGPT, GPTQ)
    packs = False       # sets Layer.packed (a runtime module): must come last on its layers
    batched = False     # the function also takes W [E, out, in] with batched stats (fused experts)
    model_level = False  # trains the whole model after the sweep before it (PERP retrain)

    def validate(self) -> None:
        for key in ("targets", "ignore"):
            pats = getattr(self, key)
            if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
                raise CompressError(f"{self.name}.{key}: expected a list of regular expressions")
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise CompressError(f"{self.name}.{key}: bad regular expression {p!r} ({e})") from None

    def link(self, later: list) -> None:
        """See the passes after this one in the recipe (AWQ takes its grid from the quant
        pass that follows it); raise CompressError if what it needs is missing."""

    def trains_packed(self, packer: "PassConfig") -> bool:
        """Whether this pass works on the runtime modules the packing pass `packer`
        leaves, rather than on dense weights (so it may run after it on its layers)."""
        return False

    def check_layer(self, name: str, out: int, d_in: int) -> None:
        """Raise CompressError if the pass cannot run on a layer of this shape; the
        runner calls it for every targeted layer before any work."""

    def cost(self, out: int, d_in: int) -> float:
        """Estimated work on one [out, d_in] layer, by which a distributed run deals the
        layers to its processes (compress.parallel): out * d_in for a pass of
        elementwise scores and masks (magnitude, Wanda)."""
        return float(out) * d_in

    @property
    def trains_blocks(self) -> bool:
        """Whether the pass has a block stage that trains on a block's calibration
        batches (GQSA's BQPO, PERP's reconstruct)."""
        return self.name in BLOCK_FNS and not self.model_level

    @property
    def uses_layers(self) -> bool:
        """False for a pass that may touch no linear layer (PERP training norms only)."""
        return True

    def applies_to(self, name: str) -> bool:
        hit = any(re.search(p, name) for p in self.targets)
        return hit and not any(re.search(p, name) for p in self.ignore)

    @property
    def name(self) -> str:
        return _NAME_OF[type(self)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Layer:
    """One linear layer as a pass sees it.

    W        [out, in] fp32 working weight; passes replace or edit it in place.
             (GPT-2's Conv1D stores [in, out]; the runner hands it over transposed.)
    W_dense  [out, in] the weight before this sweep touched it (read only).
    stats    statistics of the layer's input X over the calibration tokens.
    """

    name: str
    W: torch.Tensor
    W_dense: torch.Tensor
    stats: Optional[InputStats]
    info: dict = field(default_factory=dict)  # per-layer notes a pass adds to report.json
    # The runtime form a packing pass produced (e.g. a QuantResult): it has
    # `dequantize()` (equal to W); the runner swaps in compress.nn.module_for(packed).
    packed: Optional[object] = None
    # The N:M pattern (N, M) the zeros of W follow, set by the pruning pass that made
    # them; a later pass that moves zeros (DSnoT) keeps it.
    nm: Optional[tuple[int, int]] = None
    # The largest |w| over this layer and those a serving engine fuses with it (q/k/v,
    # gate/up: compress.models.serving_groups), as they stood when this layer stage
    # began: NVFP4's shared global scale.
    fused_absmax: Optional[float] = None

    @property
    def mask(self) -> torch.Tensor:
        """Kept weights (True) as the layer stands now."""
        return self.W != 0


# ----------------------------------------------------------------------------- registry

PassFn = Callable[[Layer, PassConfig], None]
REGISTRY: dict[str, tuple[type, PassFn]] = {}
_NAME_OF: dict[type, str] = {}


def register(name: str, config_cls: type):
    """Decorator: `@register("wanda", WandaConfig)` on the pass function."""

    def wrap(fn: PassFn) -> PassFn:
        REGISTRY[name] = (config_cls, fn)
        _NAME_OF[config_cls] = name
        return fn

    return wrap


# Block passes: a second function of a pass that runs once per decoder block, after
# every layer pass of the sweep, e.g. GQSA's block-wise optimization (BQPO).
BlockFn = Callable[["BlockContext", PassConfig], None]
BLOCK_FNS: dict[str, BlockFn] = {}


def register_block(name: str):
    """Decorator: `@register_block("gqsa")` on the pass's block function."""

    def wrap(fn: BlockFn) -> BlockFn:
        BLOCK_FNS[name] = fn
        return fn

    return wrap


@dataclass
class BlockContext:
    """What a block pass sees; the runner owns the loop, the data and the devices.

    block    the decoder block, on `device`, parameters in the calibration dtype `dtype`
    layers   {qualified name: Layer} of the layers the pass targets, after the layer passes
    modules  {qualified name: the linear module in `block`} (same keys)
    targets  the dense block's output for each calibration batch [batch, seq, d] (None
             unless a pass of the sweep trains on them: `trains_blocks`)
    forward  forward(k): the block's output [batch, seq, d] on calibration batch k, as
             the block stands now (with the arguments the model gives this block);
             gradients follow the caller's mode, so a pass can train through it
    masters  {parameter name in the block: fp32 copy} that the runner writes back after
             forwards in a reduced dtype (runner.run_in_dtype), or None when the block runs
             in its own dtype: a pass that changes a parameter other than a layer's W (AWQ
             folding a scale into a norm) writes both it and the live parameter
    """

    block: "torch.nn.Module"
    layers: dict
    modules: dict
    targets: list
    device: torch.device
    dtype: torch.dtype
    forward: Callable[[int], torch.Tensor]
    masters: Optional[dict] = None


def second_order_cost(out: int, d_in: int) -> float:
    """SparseGPT's / GPTQ's work on one [out, d_in] layer: the Hessian's Cholesky inverse
    (about d_in^3 / 3 multiply-adds, BLAS-3) plus the column loop's updates (out * d_in^2)."""
    return float(d_in) ** 3 / 3 + float(out) * d_in * d_in


def make_config(name: str, args: Optional[dict]) -> PassConfig:
    """Build and validate a config from a recipe entry `{name: {args}}`."""
    if name not in REGISTRY:
        raise CompressError(f"passes: unknown pass {name!r}; valid passes: {', '.join(sorted(REGISTRY))}")
    cls, _ = REGISTRY[name]
    args = dict(args or {})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - valid)
    if unknown:
        raise CompressError(f"{name}: unknown argument {unknown[0]!r}; valid arguments: {', '.join(sorted(valid))}")
    try:
        cfg = cls(**args)
    except TypeError as e:
        raise CompressError(f"{name}: {e}") from None
    cfg.validate()
    return cfg


def pass_fn(cfg: PassConfig) -> PassFn:
    return REGISTRY[cfg.name][1]
