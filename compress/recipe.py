"""Recipes: YAML that names a model, calibration data, passes, evaluation and output.

    model: smollm2-135m
    calib: {source: c4, nsamples: 128, seqlen: 512, seed: 0}
    passes:
      - wanda: {sparsity: 0.5, pattern: "2:4"}
    runner: {device: cpu, batch_size: 8, true_sequential: false}
    eval: {dataset: wikitext2, split: test, seqlen: 512, max_windows: 64, tasks: [lastword_wikitext2]}
    output: out/wanda-2of4          # or {dir: out/wanda-2of4, dtype: float16}

Everything is validated before any heavy work starts; a problem is one CompressError
naming the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from compress.config import build_config as _build
from compress.errors import CompressError

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2:4` as the base-60 integer 124; recipes mean the N:M pattern.
    This loader keeps ordinary ints and floats but leaves `N:M` a string."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


TOP_KEYS = ("model", "dtype", "calib", "passes", "runner", "eval", "output")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class RunnerConfig:
    device: Optional[str] = None   # cpu | cuda | cuda:N; default: cuda if present
    batch_size: int = 8            # calibration sequences per forward
    true_sequential: bool = False  # re-collect statistics between qkv -> o -> gate/up -> down
    compute_dtype: Optional[str] = None  # calibration forwards; default bf16 on CPUs with native bf16
    offload: bool = False          # keep the blocks on disk, one in memory at a time (compress.offload)
    moe_calibration: str = "all"   # fused experts' statistics: all | routed tokens (compress.routing)
    moe_min_tokens: int = 16       # experts that saw fewer tokens are compressed data-free


@dataclass
class EvalConfig:
    dataset: str = "wikitext2"     # wikitext2 | c4 (split: validation) | ptb
    split: str = "test"
    seqlen: int = 512
    max_windows: Optional[int] = None
    batch_size: int = 4
    compare: bool = True           # also evaluate the dense model: KL and top-1 agreement
    data_dir: Optional[str] = None
    tasks: Optional[list] = None   # lm-eval task names (compress.tasks), e.g. [arc_easy, lastword_wikitext2]
    num_fewshot: Optional[int] = None   # lm-eval's few-shot examples; default: each task's own (0 for most)
    limit: Optional[int] = None    # score only the first `limit` examples of each task


@dataclass
class OutputConfig:
    dir: Optional[str] = None
    dtype: Optional[str] = None    # cast the saved weights; default: the model's dtype (exports: float16)
    format: Optional[str] = None   # hf | compressed-tensors | gguf; default: our own save (compress.load)
    fold: bool = False             # export: store layers the format cannot express as dense weights
    sparse_format: str = "dense"   # compressed-tensors: dense | bitmask (sparse-24-bitmask, 2:4 only)
    gguf_type: str = "Q8_0"        # gguf: F16 | Q8_0 | Q4_0 | Q4_1

    def export_config(self):
        """The ExportConfig of `format` (None when the output is our own save)."""
        from compress.export import ExportConfig

        if self.format is None:
            return None
        return ExportConfig(format=self.format, dtype=self.dtype or "float16", fold=self.fold,
                            sparse_format=self.sparse_format, gguf_type=self.gguf_type)


def _check_int(value, name: str, lo: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise CompressError(f"{name}: expected an integer >= {lo}, got {value!r}")


def _check_str(value, name: str) -> None:
    """An optional non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise CompressError(f"{name}: expected a non-empty string, got {value!r}")


def _check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise CompressError(f"{name}: expected true or false, got {value!r}")


def check_eval(ev: EvalConfig) -> EvalConfig:
    """Validate the `eval:` section. Task names are checked against lm-eval's here, so
    that a typo fails before the model is loaded (compress.tasks)."""
    if ev.dataset not in ("wikitext2", "c4", "ptb"):
        raise CompressError(f"eval.dataset: expected wikitext2, c4 or ptb, got {ev.dataset!r}")
    _check_int(ev.seqlen, "eval.seqlen", lo=2)
    _check_int(ev.max_windows, "eval.max_windows", optional=True)
    _check_int(ev.batch_size, "eval.batch_size")
    _check_bool(ev.compare, "eval.compare")
    for key in ("split", "data_dir"):
        _check_str(getattr(ev, key), f"eval.{key}")
    _check_int(ev.num_fewshot, "eval.num_fewshot", lo=0, optional=True)
    _check_int(ev.limit, "eval.limit", optional=True)
    for key in ("num_fewshot", "limit"):
        if getattr(ev, key) is not None and ev.tasks is None:
            raise CompressError(f"eval.{key}: applies to task accuracy only; name the tasks in eval.tasks")
    if ev.tasks is not None:
        if not isinstance(ev.tasks, list) or not ev.tasks or \
                not all(isinstance(t, str) and t and t == t.strip() and "," not in t for t in ev.tasks):
            raise CompressError(f"eval.tasks: expected a non-empty list of lm-eval task names "
                                f"(e.g. [arc_easy, lastword_wikitext2]), got {ev.tasks!r}")
        from compress.tasks import check_task_names

        check_task_names(ev.tasks, "eval.tasks")
    return ev


@dataclass
class Recipe:
    model: str
    passes: list
    calib: Any = None                  # calib.CalibConfig
    dtype: str = "float32"
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    eval: Optional[EvalConfig] = None
    output: OutputConfig = field(default_factory=OutputConfig)
    raw: dict = field(default_factory=dict)  # the YAML mapping after --set overrides

    def resolved(self) -> dict:
        """The recipe as it ran: every section with its defaults filled in."""
        from compress.api import as_configs

        asdict = dataclasses.asdict
        return {"model": self.model, "dtype": self.dtype, "calib": asdict(self.calib),
                "passes": [{c.name: c.to_dict()} for c in as_configs(self.passes)],
                "runner": asdict(self.runner), "eval": asdict(self.eval) if self.eval else None,
                "output": asdict(self.output)}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(yaml.safe_dump(self.raw, sort_keys=True).encode()).hexdigest()


def set_override(raw: dict, assignment: str) -> None:
    """Apply `--set a.b.0.c=value` (value parsed as YAML) to the recipe mapping."""
    if "=" not in assignment:
        raise CompressError(f"--set: expected KEY=VALUE, got {assignment!r}")
    path, value = assignment.split("=", 1)
    keys = path.split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise CompressError(f"--set {path}: {'.'.join(keys[:i]) or 'recipe'} has no item {key!r}")
            key = int(key)
        elif not isinstance(node, dict):
            raise CompressError(f"--set {path}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = yaml_load(value)
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_recipe(raw: Any, overrides: Optional[list[str]] = None) -> Recipe:
    """Validate a recipe mapping (after `--set` overrides) into a Recipe."""
    from calib import CalibConfig
    from compress.api import as_configs, moe_options

    if not isinstance(raw, dict):
        raise CompressError("recipe: expected a YAML mapping with keys " + ", ".join(TOP_KEYS))
    for a in overrides or []:
        set_override(raw, a)
    for key in raw:
        if key not in TOP_KEYS:
            raise CompressError(f"recipe: unknown key {key!r}; valid keys: {', '.join(TOP_KEYS)}")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise CompressError("model: expected a hub id, a local folder, a .gguf file or 'smollm2-135m'")
    if raw.get("dtype", "float32") not in DTYPES:
        raise CompressError(f"dtype: expected one of {', '.join(DTYPES)}, got {raw['dtype']!r}")
    if not isinstance(raw.get("passes"), list) or not raw["passes"]:
        raise CompressError("passes: expected a non-empty list of {pass_name: {arguments}}")
    as_configs(raw["passes"])  # validates every pass and argument
    calib = CalibConfig.from_dict(raw.get("calib"))
    runner = _build(RunnerConfig, raw.get("runner"), "runner")
    _check_int(runner.batch_size, "runner.batch_size")
    _check_bool(runner.true_sequential, "runner.true_sequential")
    _check_bool(runner.offload, "runner.offload")
    moe_options(runner.moe_calibration, runner.moe_min_tokens)
    if runner.compute_dtype is not None and runner.compute_dtype not in DTYPES:
        raise CompressError(f"runner.compute_dtype: expected one of {', '.join(DTYPES)}, got {runner.compute_dtype!r}")
    if runner.device is not None and not (isinstance(runner.device, str) and
                                          re.fullmatch(r"cpu|mps|cuda(:\d+)?", runner.device)):
        raise CompressError(f"runner.device: expected cpu, cuda or cuda:N, got {runner.device!r}")
    ev = None if raw.get("eval") is None else check_eval(_build(EvalConfig, raw["eval"], "eval"))
    out = raw.get("output")
    if out is not None and not isinstance(out, (str, dict)):
        raise CompressError(f"output: expected a folder path or {{dir: ..., dtype: ...}}, got {out!r}")
    output = _build(OutputConfig, {"dir": out} if isinstance(out, str) else out, "output")
    for key in ("dir", "dtype", "format", "sparse_format", "gguf_type"):
        _check_str(getattr(output, key), f"output.{key}")
    if output.dtype is not None and output.dtype not in DTYPES:
        raise CompressError(f"output.dtype: expected one of {', '.join(DTYPES)}, got {output.dtype!r}")
    if output.format is not None:
        output.export_config().validate()
    if runner.offload:   # these need the whole model in memory at once
        for key, what in (("eval", ev), ("output.format", output.format)):
            if what is not None:
                raise CompressError(f"runner.offload: {key} needs the whole model in memory; drop it and run "
                                    f"`compress {'eval' if key == 'eval' else 'export'}` on the output")
    return Recipe(model=raw["model"], passes=raw["passes"], calib=calib, dtype=raw.get("dtype", "float32"),
                  runner=runner, eval=ev, output=output, raw=raw)


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"recipe: file {path!r} does not exist")
    try:
        raw = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())   # one line
        raise CompressError(f"recipe: {path} is not valid YAML{where}: {why}") from None
    return parse_recipe(raw, overrides)
