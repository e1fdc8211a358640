"""One process of the distributed tests (tests/test_dist.py): run under torchrun, by
hand with RANK / WORLD_SIZE set, or alone (the one-process reference).

    python tests/dist_worker.py SPEC.json

SPEC: {"arch": "llama", "passes": [...], "nsamples": 6, "out": PREFIX, "compute_dtype":
null, "run_dir": DIR or null, "resume": false, "crash": {"rank": r (-1: every rank),
"block": i} or null, "sparsity_of_rank_1": null, "stats": false, "cli": [arguments] or
null}. Writes PREFIX.rank{r}.pt: the model's state dict, the effective weights of its
packed modules and the report; with "stats" the all-summed statistics of a fixed
matrix's shard; with "cli" it runs the command line and notes each output written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compress  # noqa: E402
from archs import ids, tiny  # noqa: E402
from compress import dist  # noqa: E402


def stats_case(spec: dict) -> dict:
    """X [40, 16] fixed: this rank's rows (r, r + N, ...) in InputStats, summed over the ranks."""
    from compress.parallel import reduce_stats
    from compress.stats import InputStats

    dist.init("cpu")
    X = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    s = InputStats(16, True, torch.device("cpu"))
    s.update(X[dist.shard(40)])
    reduce_stats({"a": s, "b": s})   # shared: summed once
    return {"n": s.n, "sum": s.sum, "sumsq": s.sumsq, "xtx": s.xtx}


def crash_at(spec: dict) -> None:
    """Make this rank stop dead (os._exit, as a killed process) when it reaches block i."""
    crash = spec.get("crash")
    if not crash or crash["rank"] not in (-1, int(os.environ.get("RANK", "0"))):   # -1: every rank
        return
    import compress.runner as runner

    real = runner._sweep_block

    def dying(model, blocks, i, *a, **k):
        if i == crash["block"]:
            sys.stderr.flush()
            os._exit(3)
        return real(model, blocks, i, *a, **k)

    runner._sweep_block = dying


def cli_case(spec: dict, rank: int) -> int:
    """The command line on spec["cli"], noting in PREFIX.writes.rank{r} each output this
    rank writes."""
    import compress.pipeline as pipeline
    from cli import main as cli_main

    real = pipeline.write_output

    def noted(recipe, out_dir, *a, **k):
        with open(f"{spec['out']}.writes.rank{rank}", "a") as f:
            f.write(f"{out_dir}\n")
        return real(recipe, out_dir, *a, **k)

    pipeline.write_output = noted
    return cli_main(spec["cli"])


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if spec.get("cli"):
        sys.exit(cli_case(spec, rank))
    if spec.get("stats"):
        torch.save(stats_case(spec), f"{spec['out']}.rank{rank}.pt")
        return
    crash_at(spec)
    passes = spec["passes"]
    if rank == 1 and spec.get("sparsity_of_rank_1") is not None:
        passes = [{"wanda": {"sparsity": spec["sparsity_of_rank_1"]}}]
    model = tiny(spec.get("arch", "llama"))
    x = ids(spec.get("nsamples", 6))
    from compress.resume import RunState

    try:
        state = RunState(spec["run_dir"], "fp", resume=spec.get("resume", False)) if spec.get("run_dir") else None
        _, report = compress.run(model, passes, calib=x, batch_size=2, state=state,
                                 compute_dtype=spec.get("compute_dtype"))
    except compress.CompressError as e:   # as the command line does: one line, exit 2
        print(f"compress: error: {e}", file=sys.stderr)
        sys.exit(2)
    weights = {n: m.effective_weight().detach() for n, m in model.named_modules() if hasattr(m, "effective_weight")}
    torch.save({"state": model.state_dict(), "weights": weights, "report": report}, f"{spec['out']}.rank{rank}.pt")


if __name__ == "__main__":
    main()
