"""Fused Mixture-of-Experts weights as layers: what an experts module computes, read
from the module itself, and [E, out, in] views of each projection's weights.

transformers 5 stores the experts of one MoE block as 3-D parameters, e.g. Mixtral's

    gate_up_proj [E, 2I, H]   (gate rows, then up rows)      down_proj [E, H, I]

and gpt-oss's transposed, interleaved and biased ones (gate_up_proj [E, H, 2I] with
gate = columns 0, 2, 4, ...). Experts classes declare their layout through
transformers' `use_experts_implementation` (`has_gate`, `is_transposed`,
`is_concatenated`, `has_bias`, `_apply_gate`); their forward is
forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) and scales each
expert's output by its routing weight. Llama 4's experts are not decorated: they take
every token for every expert, already scaled by the router, as [E * T, H], with weights
stored [E, in, out] and gate / up concatenated (`dense` dispatch).

Each expert's projection is a layer named ``<experts>.<e>.<gate_proj|up_proj|down_proj>``.
`Experts.recompute` redoes the experts' forward for statistics; the runner checks it
against the module's own output on the first batch (`check_output`), so a layout read
wrongly is refused, never compressed. Anything else is refused, naming its class.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from compress.errors import CompressError


@dataclass(frozen=True)
class Proj:
    """One per-expert layer of a fused parameter: `param` [E, rows, cols] holds it in
    `rows` (a half of gate_up_proj, or all); `name` is its per-expert layer name."""

    param: str
    name: str
    half: Optional[int] = None   # 0 = gate, 1 = up of a fused gate_up_proj; None = the whole parameter


def view_of(t: torch.Tensor, p: Proj, transposed: bool, concatenated: bool) -> torch.Tensor:
    """Projection p's view of a fused tensor t [E, rows, cols] ([E, in, out] when
    `transposed`) or its bias [E, rows]: [E, out, in] (or [E, out]); a half of a fused
    gate_up is its first / second rows (concatenated) or its even / odd rows."""
    if transposed:
        t = t.transpose(1, 2)                                            # [E, out_all, in]
    if p.half is None:
        return t
    half = t.shape[1] // 2
    return t[:, p.half * half:(p.half + 1) * half] if concatenated else t[:, p.half::2]


def fused_params(m: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters of three or more dimensions that are not convolution
    kernels: fused experts (the only such weights in transformers' decoders)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return {}
    return {n: p for n, p in m.named_parameters(recurse=False) if p.dim() >= 3}


class Experts:
    """The layout of one fused experts module (see the module docstring)."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        cls = type(module).__name__
        params = fused_params(module)
        self.decorated = all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))
        if self.decorated:
            self.gated, self.transposed = bool(module.has_gate), bool(module.is_transposed)
            self.concatenated, self.biased = bool(module.is_concatenated), bool(getattr(module, "has_bias", False))
            self.dispatch = "routed"
        elif set(params) == {"gate_up_proj", "down_proj"} and hasattr(module, "act_fn") and \
                list(inspect.signature(module.forward).parameters) == ["hidden_states"]:
            # Llama 4: every expert on every (pre-scaled) token, weights [E, in, out].
            H = params["down_proj"].shape[-1]
            self.gated, self.transposed, self.concatenated, self.biased = True, params["gate_up_proj"].shape[1] == H, \
                True, False
            self.dispatch = "dense"
        else:
            raise CompressError(f"model: {name} ({cls}) holds fused expert weights ({', '.join(params) or 'none'}) "
                                f"in a layout this toolkit does not know; add {name} to the passes' ignore")
        up = "gate_up_proj" if self.gated else "up_proj"
        if up not in params or "down_proj" not in params or len(params) != 2:
            raise CompressError(f"model: {name} ({cls}) has fused parameters {sorted(params)}, expected "
                                f"{up} and down_proj; add {name} to the passes' ignore")
        self.num = params["down_proj"].shape[0]
        self.projs = ([Proj(up, "gate_proj", 0), Proj(up, "up_proj", 1)] if self.gated else [Proj(up, "up_proj")]) \
            + [Proj("down_proj", "down_proj")]
        if getattr(module, "has_post_expert_norm", False):
            raise CompressError(f"model: {name} ({cls}) normalizes each expert's output; this toolkit does not "
                                f"model that yet; add {name} to the passes' ignore")
        if self.gated:
            self._check_halves()

    def _check_halves(self) -> None:
        """The gating must be linear in what this layout calls `up` and not in `gate`
        (act(gate) * up, gpt-oss's (up + 1) * glu(gate)): a probe through the module's
        own gating catches halves read the wrong way round."""
        g = torch.Generator().manual_seed(0)
        G, U = torch.randn(8, 16, generator=g) * 2, torch.randn(8, 16, generator=g)   # [tokens, I]
        w = getattr(self.module, "gate_up_proj")
        f = lambda a, b: self.hidden(self.assemble(a, b).to(w.dtype)).float()
        with torch.no_grad():
            lin_up = (f(G, 2 * U) - f(G, 0 * U) - 2 * (f(G, U) - f(G, 0 * U))).abs().max()
            lin_gate = (f(2 * G, U) - f(0 * G, U) - 2 * (f(G, U) - f(0 * G, U))).abs().max()
        if not (lin_up <= 1e-2 * max(float(lin_gate), 1e-6) and lin_gate > 1e-3):
            raise CompressError(f"model: {self.name} ({type(self.module).__name__}): its gating does not read "
                                f"gate_up_proj as {'concatenated' if self.concatenated else 'interleaved'} "
                                f"[gate, up] halves; add {self.name} to the passes' ignore")

    def assemble(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The fused gate_up output [..., 2I] of halves [..., I] in this module's layout."""
        if self.concatenated:
            return torch.cat([gate, up], dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)

    # -------------------------------------------------------------------- weights
    def weights(self, p: Proj, param: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[E, out, in] view of projection p (of `param`, default the module's own)."""
        t = getattr(self.module, p.param) if param is None else param
        return view_of(t, p, self.transposed, self.concatenated)

    def bias(self, p: Proj) -> Optional[torch.Tensor]:
        """[E, out] view of projection p's bias, or None."""
        if not self.biased:
            return None
        return view_of(getattr(self.module, f"{p.param}_bias"), p, False, self.concatenated)

    def layer_name(self, e: int, p: Proj) -> str:
        return f"{self.name}.{e}.{p.name}"

    # -------------------------------------------------------------------- forward
    def routing(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(X [E, T, H] each expert's input, routed [E, T] bool, weight [E, T] or None)
        from the arguments of one forward call. A routed expert sees the tokens routed to
        it; X holds every token for every expert (as a broadcast view where it can)."""
        if self.dispatch == "dense":
            x = args[0]
            X = x.reshape(self.num, -1, x.shape[-1])                     # [E, T, H], pre-scaled
            return X, X.abs().amax(-1) > 0, None
        x, idx, w = args[0], args[1], args[2]
        x = x.reshape(-1, x.shape[-1])                                   # [T, H]
        E, T = self.num, x.shape[0]
        hit = idx.reshape(T, -1)                                         # [T, k]
        onehot = torch.zeros(T, E + 1, dtype=torch.bool, device=x.device)
        onehot.scatter_(1, hit.clamp(max=E).long(), True)                # index E: "no expert" (expert parallelism)
        weight = torch.zeros(T, E + 1, dtype=torch.float32, device=x.device)
        weight.scatter_add_(1, hit.clamp(max=E).long(), w.reshape(T, -1).float())
        return x.unsqueeze(0).expand(E, T, x.shape[-1]), onehot[:, :E].T, weight[:, :E].T

    def hidden(self, up_out: torch.Tensor) -> torch.Tensor:
        """The down projection's input from the gate_up (or up) projection's output."""
        m = self.module
        if not self.gated:
            return m.act_fn(up_out)
        if self.decorated:
            return m._apply_gate(up_out)
        gate, up = up_out.chunk(2, dim=-1)
        return m.act_fn(gate) * up

    def project(self, p: str, X: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Apply fused parameter `p` ('gate_up_proj', ...) of `experts` [n] to X [n, t, in],
        in the parameter's dtype (the block's compute dtype): [n, t, out]."""
        W = getattr(self.module, p)[experts]                            # [n, out, in] or [n, in, out]
        Y = X.to(W.dtype) @ (W if self.transposed else W.transpose(1, 2))
        if self.biased:
            Y = Y + getattr(self.module, f"{p}_bias")[experts][:, None, :]
        return Y


def find_experts(block: nn.Module, prefix: str, refuse: Callable[[str], bool] = lambda name: True) -> dict[str, Experts]:
    """{qualified name: Experts} of the fused experts modules in one block. One that is
    not understood is refused, naming its class, when `refuse(its name)` (a pass would
    target its experts), and otherwise left out (coverage reports it untouched)."""
    out = {}
    for n, m in block.named_modules():
        name = f"{prefix}.{n}" if prefix else n
        if not fused_params(m) or _inside_packed(block, n):
            continue
        try:
            out[name] = Experts(m, name)
        except CompressError:
            if refuse(name):
                raise
    return out


def _inside_packed(block: nn.Module, name: str) -> bool:
    """Whether module `name` is the model's own experts module inside a PackedExperts."""
    parts = name.split(".")
    return any(getattr(type(block.get_submodule(".".join(parts[:k]))), "replaces_experts", False)
               for k in range(1, len(parts)))


def check_output(ex: Experts, mine: torch.Tensor, theirs: torch.Tensor) -> None:
    """The recomputed experts output must be the module's own (to the rounding of the
    calibration dtype): otherwise its forward is not what this toolkit reads it as."""
    err = float((mine - theirs.float()).norm() / theirs.float().norm().clamp_min(1e-12))
    if err > 0.05:
        raise CompressError(f"model: {ex.name} ({type(ex.module).__name__}) computes something other than the "
                            f"experts layout this toolkit reads from it (relative difference {err:.3f}); add "
                            f"{ex.name} to the passes' ignore")


class ExpertLinear:
    """One projection of every expert of a fused module, where the runner keeps its
    linear layers: `weight` [E, out, in] is a view of the fused parameter (writing it
    writes the module), `names` the per-expert layer names."""

    replaces_linear = False

    def __init__(self, ex: Experts, proj: Proj):
        self.ex, self.proj = ex, proj
        self.names = [ex.layer_name(e, proj) for e in range(ex.num)]

    @property
    def weight(self) -> torch.Tensor:
        return self.ex.weights(self.proj)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.ex.bias(self.proj)

    @property
    def key(self) -> str:
        """The runner's name for the whole group: ``<experts>.<proj>``."""
        return f"{self.ex.name}.{self.proj.name}"


def expert_linears(block: nn.Module, prefix: str, refuse: Callable[[str], bool] = lambda name: True
                   ) -> dict[str, ExpertLinear]:
    """{group name: ExpertLinear} of every projection of every fused experts module of a
    block (`refuse`: see find_experts)."""
    out = {}
    for ex in find_experts(block, prefix, refuse).values():
        for p in ex.projs:
            el = ExpertLinear(ex, p)
            out[el.key] = el
    return out


def published_names(model: nn.Module, ex: Experts) -> dict[str, str]:
    """{projection name: its name in the model's published per-expert checkpoints}, e.g.
    Mixtral's {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}: what transformers'
    own reverse conversion makes of the fused parameters when it saves them. Small tagged
    stand-ins of the fused tensors go through it, and each piece that comes out is found
    by its tags. A model saved fused (no conversion) keeps the projection names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {p.name: p.name for p in ex.projs}
    out_dim = 2 if ex.transposed else 1
    tagged, total = {}, 0
    for param in dict.fromkeys(p.param for p in ex.projs):
        shape = [ex.num, 3, 3]
        shape[out_dim] = 4                                   # even: gate_up splits in two halves
        tagged[f"{ex.name}.{param}"] = torch.arange(total, total + math.prod(shape), dtype=torch.float64).reshape(shape)
        total += math.prod(shape)
    got = revert_weight_conversion(model, dict(tagged))
    names = {}
    for p in ex.projs:
        first = float(ex.weights(p, tagged[f"{ex.name}.{p.param}"])[0].flatten()[0])   # expert 0's first weight
        hit = [k for k, t in got.items() if t.numel() and first in t.flatten()[:1].tolist()]
        names[p.name] = hit[0].rsplit(".", 2)[-2] if len(hit) == 1 and hit[0].endswith(".weight") else p.name
    return names
