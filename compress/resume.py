"""A run's progress on disk, so that a run killed at any point resumes after its last
finished block and ends with the same bytes as a run that was never interrupted.

    RUN_DIR/run.json                 fingerprint (recipe + calibration ids) and progress
    RUN_DIR/s{S}/block{i}.safetensors  block i after sweep S: its state (packed buffers
                                     too), the global RNG state
    RUN_DIR/s{S}/block{i}.json       its runtime modules' metas and its report rows
    RUN_DIR/s{S}/hidden{i}.safetensors  the calibration hidden states after block i,
                                     the last finished one (what the next block reads);
                                     hidden{i}.rank{r}.safetensors per rank of a
                                     distributed run (each holds its own samples)
    RUN_DIR/s{S}/model.safetensors   the whole model after a model-level stage (PERP)

Every file is written to a temporary name and renamed, and run.json, renamed last,
says what is complete: a kill between two renames leaves the previous state whole
(the hidden states of the block before are deleted only after the commit). In a
distributed run (compress.dist) rank 0 writes the blocks, the snapshots and run.json,
every rank its own hidden states, and a barrier orders the writes before the commit;
such a run resumes with the same number of processes.
Restoring replays the newest model snapshot, then the block files of the sweeps after
it, in order. The calibration inputs' other arguments (each block's masks and rotary
tables) are captured again; only the hidden states are stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compress import dist
from compress.errors import CompressError

log = logging.getLogger(__name__)


def fingerprint(recipe_sha: str, ids: torch.Tensor) -> str:
    """What a run's results depend on: the resolved recipe and the calibration ids."""
    return hashlib.sha256(f"{recipe_sha}:{hashlib.sha256(ids.numpy().tobytes()).hexdigest()}".encode()).hexdigest()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _meta_of(module: torch.nn.Module, prefix: str = "") -> dict:
    """{qualified name: meta} of the runtime modules (QuantLinear...) inside `module`."""
    from compress.nn import runtime_modules
    return {".".join(filter(None, (prefix, n))): m.meta() for n, m in runtime_modules(module).items()}


def swap_in(model, metas: dict) -> None:
    """Put empty runtime modules where the saved state has them (they are filled next)."""
    from compress.nn import empty_module
    for name, meta in metas.items():
        old = model.get_submodule(name)
        if type(old).__name__ != meta["type"]:
            dev = next(iter(old.state_dict().values())).device
            model.set_submodule(name, empty_module(meta, old).to(dev))


class RunState:
    """Progress of one run in `path`. Fresh (resume=False): the folder is emptied and
    claimed. Resuming: its fingerprint must match this run's."""

    def __init__(self, path: str, fp: str, resume: bool):
        self.path = Path(path)
        self.fp = fp
        dist.init()   # under a launcher the ranks share the folder: join them first (no-op otherwise)
        self.main = dist.rank() == 0
        if not resume and self.main:
            self._fresh(path)
        dist.barrier("setting up the run folder")   # the others read what rank 0 wrote
        info = self.path / "run.json"
        if not info.is_file():
            raise CompressError(f"--resume: {path!r} holds no run (no run.json)")
        self.progress = json.loads(info.read_text())
        if self.progress.get("fingerprint") != fp:
            raise CompressError(f"--resume: {path!r} was written by a different recipe or calibration set")
        if self.progress.get("processes", 1) != dist.world_size():
            raise CompressError(f"--resume: the run in {path!r} used {self.progress.get('processes', 1)} processes; "
                                f"resume it with that many, not {dist.world_size()}")

    def _fresh(self, path: str) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            if not (self.path / "run.json").is_file():
                raise CompressError(f"--run-dir: {path!r} exists and is not a run folder; name a new or empty folder")
            log.warning("discarding the interrupted run in %s (pass --resume %s to continue it)", path, path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.progress = {"fingerprint": self.fp, "processes": dist.world_size(), "stages_done": [],
                         "blocks_done": {}}
        self._commit()

    def _commit(self) -> None:
        _atomic(self.path / "run.json", lambda p: p.write_text(json.dumps(self.progress, indent=1)))

    def _dir(self, stage: int) -> Path:
        d = self.path / f"s{stage}"
        d.mkdir(exist_ok=True)
        return d

    # ------------------------------------------------------------------ writing

    def block_done(self, stage: int, i: int, block, prefix: str, hidden: list, rows: list) -> None:
        """Block i of sweep `stage` is final (runtime modules swapped in); `hidden` are
        the next block's inputs (this rank's)."""
        d = self._dir(stage)
        if self.main:
            state = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}
            state["__rng__"] = torch.get_rng_state()
            _atomic(d / f"block{i}.safetensors", lambda p: save_file(state, str(p)))
            _atomic(d / f"block{i}.json", lambda p: p.write_text(json.dumps(
                {"modules": _meta_of(block, f"{prefix}.{i}"), "rows": rows}, default=str)))
        if hidden:
            _atomic(self._hidden(stage, i),
                    lambda p: save_file({str(k): h.contiguous().cpu() for k, h in enumerate(hidden)}, str(p)))
        self._commit_all("saving block %d" % i, lambda: self.progress["blocks_done"].__setitem__(str(stage), i))
        self._hidden(stage, i - 1).unlink(missing_ok=True)   # committed: the states before are not needed

    def _hidden(self, stage: int, i: int) -> Path:
        rank = f".rank{dist.rank()}" if dist.world_size() > 1 else ""
        return self.path / f"s{stage}" / f"hidden{i}{rank}.safetensors"

    def _commit_all(self, what: str, change) -> None:
        """Every rank's files are written: record `change` in run.json (rank 0), then
        let the ranks go on."""
        change()
        dist.barrier(what)
        if self.main:
            self._commit()
        dist.barrier(what)

    def stage_done(self, stage: int, model, model_level: bool, summary: Optional[dict] = None) -> None:
        """A whole stage is complete; a model-level one (PERP) snapshots the model, with
        its report `summary`."""
        if model_level and self.main:
            from safetensors.torch import save_model
            d = self._dir(stage)
            _atomic(d / "model.safetensors", lambda p: save_model(model, str(p)))
            _atomic(d / "model.json", lambda p: p.write_text(json.dumps(
                {"modules": _meta_of(model), "tied": _tied(model), "summary": summary},
                default=str)))
        self._commit_all(f"saving stage {stage}", lambda: self.progress["stages_done"].append(stage))

    # ------------------------------------------------------------------ reading

    def is_done(self, stage: int) -> bool:
        return stage in self.progress["stages_done"]

    def last_block(self, stage: int) -> int:
        return self.progress["blocks_done"].get(str(stage), -1)

    def block_source(self, stage: int, i: int) -> tuple:
        """(file, {name in file: name in block}, runtime metas) of a saved block, for an
        offloaded model (compress.offload) to read it from."""
        d = self.path / f"s{stage}"
        with safe_open(str(d / f"block{i}.safetensors"), framework="pt") as f:
            names = {k: k for k in f.keys() if k != "__rng__"}
        return d / f"block{i}.safetensors", names, json.loads((d / f"block{i}.json").read_text())["modules"]

    def restore_blocks(self, stage: int, model, blocks, prefix: str, upto: int, lazy=None) -> list:
        """Load blocks 0..upto of sweep `stage` into `model` (or, offloaded, point `lazy`
        at them); return their report rows."""
        rows = []
        d = self.path / f"s{stage}"
        for i in range(upto + 1):
            info = json.loads((d / f"block{i}.json").read_text())
            if lazy is not None:
                lazy.point(i, *self.block_source(stage, i))
                rows += info["rows"]
                continue
            swap_in(model, info["modules"])
            state = load_file(str(d / f"block{i}.safetensors"))
            state.pop("__rng__")
            home = next(iter(blocks[i].state_dict().values())).device
            blocks[i].load_state_dict({k: v.to(home) for k, v in state.items()}, strict=True)
            rows += info["rows"]
        if upto >= 0:   # the global RNG as it was after the last saved block
            with safe_open(str(d / f"block{upto}.safetensors"), framework="pt") as f:
                torch.set_rng_state(f.get_tensor("__rng__"))
        return rows

    def block_rows(self, stage: int, n_blocks: int) -> list:
        """The report rows of a finished sweep, without loading its weights."""
        d = self.path / f"s{stage}"
        return [r for i in range(n_blocks) for r in json.loads((d / f"block{i}.json").read_text())["rows"]]

    def restore_hidden(self, stage: int) -> list[torch.Tensor]:
        h = load_file(str(self._hidden(stage, self.last_block(stage))))
        return [h[str(k)] for k in range(len(h))]

    def restore_model(self, stage: int, model) -> Optional[dict]:
        """Load the snapshot of model-level stage `stage`; return its report summary."""
        from safetensors.torch import load_model
        d = self.path / f"s{stage}"
        info = json.loads((d / "model.json").read_text())
        swap_in(model, info["modules"])
        if _tied(model) and not info["tied"]:   # PERP merged a LoRA into the tied head
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        load_model(model, str(d / "model.safetensors"), strict=True)
        return info["summary"]

    def close(self) -> None:
        """The output is written: the run folder is no longer needed (rank 0 removes it)."""
        if self.main:
            shutil.rmtree(self.path, ignore_errors=True)


def _tied(model) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight
