"""Distributed compression (compress.dist, compress.parallel): 2 CPU processes on gloo,
each run of tests/dist_worker.py, against the same work in one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import dist
from compress.batch import ExpertLayer
from compress.parallel import _units
from compress.passes.base import Layer

WORKER = Path(__file__).parent / "dist_worker.py"
ROOT = Path(__file__).resolve().parents[1]
HANG = 600   # seconds: only a guard against a hung launch, never a speed check


def _port() -> int:
    with socket.socket() as s:   # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_DIST_TIMEOUT": "60", **extra}


def launch(tmp_path, name: str, n: int = 2, **spec):
    """tests/dist_worker.py on `spec` under torchrun with n processes (n = 1: plainly,
    no process group); returns (CompletedProcess, [per-rank results])."""
    spec = {"out": str(tmp_path / name), **spec}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(WORKER), str(path)]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--master_port", str(_port())] + cmd[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=HANG, cwd=ROOT)
    results = [torch.load(p, weights_only=False) for r in range(n) if (p := tmp_path / f"{name}.rank{r}.pt").exists()]
    return proc, results


def _ok(proc, results, n):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(results) == n


def _same_everywhere(results) -> None:
    """Every rank ends with the same model, bit for bit, and the same report rows."""
    for r in results[1:]:
        for k, v in results[0]["state"].items():
            assert torch.equal(v, r["state"][k]), k
        assert r["report"]["layers"] == results[0]["report"]["layers"]


# --------------------------------------------------------------------- in one process

def test_assign_deals_every_unit_once_largest_first_to_the_least_loaded_rank():
    costs = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0, "e": 3.0}
    # by hand: a -> 0 (5, 0); b -> 1 (5, 4); c -> 1 (5, 7); d -> 0 (8, 7); e -> 1 (8, 10)
    assert dist.assign(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert dist.assign(costs, 1) == dict.fromkeys(costs, 0)
    assert set(dist.assign(costs, 8).values()) == {0, 1, 2, 3, 4}   # more ranks than units: one each


def test_units_are_the_layers_and_every_expert_costed_by_their_passes():
    import compress
    dense = Layer("b.q", torch.zeros(6, 4), torch.zeros(6, 4), None)
    experts = ExpertLayer("b.e", torch.zeros(3, 5, 8), torch.zeros(3, 5, 8), None, names=["b.e.0", "b.e.1", "b.e.2"])
    layers = {"b.q": dense, "b.e": experts}
    sgpt = [compress.SparseGPT(sparsity=0.5)]   # the Hessian inverse d^3 / 3 plus the column loop out * d^2
    assert _units(layers, layers, sgpt) == {("b.q", None): 4 ** 3 / 3 + 6 * 4 ** 2, ("b.e", 0): 8 ** 3 / 3 + 5 * 8 ** 2,
                                            ("b.e", 1): 8 ** 3 / 3 + 5 * 8 ** 2, ("b.e", 2): 8 ** 3 / 3 + 5 * 8 ** 2}
    wanda = [compress.Wanda(sparsity=0.5, ignore=[r"e\.1$"])]   # elementwise: out * d_in; untargeted: 0
    assert _units(layers, layers, wanda) == {("b.q", None): 24, ("b.e", 0): 40, ("b.e", 1): 0, ("b.e", 2): 40}
    rtn = compress.Quant(method="rtn", clip_search=False)
    assert _units(layers, ["b.q"], [rtn]) == {("b.q", None): 24}
    gptq = compress.Quant()                     # + 80 clip candidates x 10 operations per weight
    assert _units(layers, ["b.q"], [gptq]) == {("b.q", None): 4 ** 3 / 3 + 6 * 4 ** 2 + 24 * 800}
    owner = dist.assign(_units(layers, layers, sgpt), 2)
    assert sorted(owner) == sorted(_units(layers, layers, sgpt))   # every unit exactly once
    assert sorted(set(owner.values())) == [0, 1]


def test_outside_a_process_group_everything_is_one_process():
    assert (dist.rank(), dist.world_size(), dist.active()) == (0, 1, False)
    assert dist.shard(5) == [0, 1, 2, 3, 4]
    t = torch.ones(3)
    dist.all_sum([t])
    assert torch.equal(t, torch.ones(3))


def test_a_bad_timeout_is_one_line(monkeypatch):
    from compress.errors import CompressError
    monkeypatch.setenv("COMPRESS_DIST_TIMEOUT", "soon")
    with pytest.raises(CompressError, match="COMPRESS_DIST_TIMEOUT: expected a positive number"):
        dist.timeout_s()


# ------------------------------------------------------------------ two processes

def test_all_summed_statistics_equal_one_process_over_every_sample(tmp_path):
    from compress.stats import InputStats
    proc, results = launch(tmp_path, "stats", stats=True)
    _ok(proc, results, 2)
    X = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    one = InputStats(16, True, torch.device("cpu"))
    one.update(X)
    for r in results:
        assert r["n"] == 40                                    # shared stats summed once
        assert torch.allclose(r["sum"], one.sum) and torch.allclose(r["sumsq"], one.sumsq)
        assert torch.allclose(r["xtx"], one.xtx, rtol=1e-6, atol=1e-5)   # only the summation order differs
    assert torch.equal(results[0]["xtx"], results[1]["xtx"])


def test_wanda_24_on_two_processes_equals_one_process(tmp_path):
    passes = [{"wanda": {"pattern": "2:4"}}]
    proc, two = launch(tmp_path, "two", passes=passes)
    _ok(proc, two, 2)
    _, (one,) = launch(tmp_path, "one", n=1, passes=passes)
    _same_everywhere(two)
    for k, v in one["state"].items():   # Wanda's norms are fp64 sums: the same masks, the same weights
        assert torch.equal(v, two[0]["state"][k]), k
    assert two[0]["report"]["processes"] == 2 and two[0]["report"]["calibration"]["nsamples"] == 6


def test_sparsegpt_and_gptq_on_two_processes_match_one_process_to_the_summation_order(tmp_path):
    passes = [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 16, "method": "gptq"}}]
    proc, two = launch(tmp_path, "two", passes=passes, compute_dtype="float32")
    _ok(proc, two, 2)
    _, (one,) = launch(tmp_path, "one", n=1, passes=passes, compute_dtype="float32")
    _same_everywhere(two)
    a, b = one["weights"], two[0]["weights"]
    assert len(a) == 28
    for name in [n for n in a if ".layers.0." in n]:   # block 0: identical inputs, statistics to rounding
        assert torch.equal(a[name] == 0, b[name] == 0), name
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # Later blocks read propagated states that differ by that rounding; GPTQ / SparseGPT
    # near-ties then flip a few choices (measured: 0.7 % of the mask entries in 4 blocks).
    flips = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in a) / sum(v.numel() for v in a.values())
    assert flips < 0.02


def test_moe_experts_are_dealt_across_processes(tmp_path):
    passes = [{"wanda": {"pattern": "2:4"}}]
    proc, two = launch(tmp_path, "two", arch="qwen3_moe", passes=passes)
    _ok(proc, two, 2)
    _, (one,) = launch(tmp_path, "one", n=1, arch="qwen3_moe", passes=passes)
    _same_everywhere(two)
    for k, v in one["state"].items():
        assert torch.equal(v, two[0]["state"][k]), k
    tokens = [r["tokens"] for r in two[0]["report"]["layers"] if ".experts." in r["layer"]]
    assert tokens and tokens == [r["tokens"] for r in one["report"]["layers"] if ".experts." in r["layer"]]


def test_moe_gptq_packs_every_expert_the_same_on_every_rank(tmp_path):
    passes = [{"quant": {"bits": 4, "group_size": 16, "method": "gptq"}}]
    proc, two = launch(tmp_path, "two", arch="qwen3_moe", passes=passes, compute_dtype="float32")
    _ok(proc, two, 2)
    _same_everywhere(two)
    _, (one,) = launch(tmp_path, "one", n=1, arch="qwen3_moe", passes=passes, compute_dtype="float32")
    experts = [n for n in one["weights"] if ".layers.0." in n]
    assert experts
    for n in experts:
        assert torch.allclose(one["weights"][n], two[0]["weights"][n], atol=1e-6), n


# ------------------------------------------------------------------ bad set-ups

def _last_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("compress: error:") or "compress: error:" in ln]
    return lines[-1] if lines else proc.stderr[-2000:]


@pytest.mark.parametrize("spec, message", [
    ({"nsamples": 1}, "calib.nsamples: 1 calibration samples for 2 processes"),
    ({"sparsity_of_rank_1": 0.6}, "the recipe and calibration set differs between processes (rank 0 against rank 1)"),
    ({"passes": [{"gqsa": {"bits": 4, "group_size": 16}}]}, "gqsa: its block stage trains on every calibration"),
])
def test_a_bad_setup_stops_every_rank_with_one_line(tmp_path, spec, message):
    proc, results = launch(tmp_path, "bad", **{"passes": [{"wanda": {"sparsity": 0.5}}], **spec})
    assert proc.returncode != 0 and not results
    assert message in _last_line(proc)
    assert "Traceback" not in "\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("[rank"))


def test_a_killed_rank_makes_the_other_stop(tmp_path):
    """Started by hand (no torchrun, which would kill the survivor itself): rank 1 dies
    at block 1; rank 0, in the next collective, must exit with one line, not hang."""
    spec = {"out": str(tmp_path / "k"), "passes": [{"sparsegpt": {"sparsity": 0.5}}], "crash": {"rank": 1, "block": 1}}
    (tmp_path / "k.json").write_text(json.dumps(spec))
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "k.json")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, COMPRESS_DIST_TIMEOUT="30"))
             for r in range(2)]
    outs = [p.communicate(timeout=HANG) for p in procs]   # a hang fails here
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, outs[0][1][-2000:]
    last = outs[0][1].strip().splitlines()[-1]
    assert last.startswith("compress: error: distributed:") and "failed on rank 0 of 2" in last


# ------------------------------------------------------------------ output and resume

def test_only_rank_0_writes_the_output(tmp_path, tiny4_dir, corpus):
    import yaml
    from transformers import AutoModelForCausalLM

    from helpers import is_nm
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny4_dir), "passes": [{"wanda": {"pattern": "2:4"}}],
                                      "calib": {"source": "text", "path": str(corpus), "nsamples": 6, "seqlen": 32}}))
    proc, _ = launch(tmp_path, "cli", cli=["-q", "run", str(recipe), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cli.writes.rank0").read_text() == f"{out}\n"
    assert not (tmp_path / "cli.writes.rank1").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["calibration"]["nsamples"] == 6
    assert not Path(f"{out}.run").exists()   # the run folder is gone once the output is written
    assert is_nm(AutoModelForCausalLM.from_pretrained(out).model.layers[3].mlp.down_proj.weight, 2, 4)


def test_a_two_process_run_resumes_where_it_stopped(tmp_path):
    passes = [{"sparsegpt": {"pattern": "2:4"}}]
    proc, whole = launch(tmp_path, "whole", passes=passes, run_dir=str(tmp_path / "run_whole"))
    _ok(proc, whole, 2)
    run = str(tmp_path / "run")
    proc, cut = launch(tmp_path, "cut", passes=passes, run_dir=run, crash={"rank": -1, "block": 2})
    assert proc.returncode != 0 and not cut
    progress = json.loads((Path(run) / "run.json").read_text())
    assert progress["blocks_done"] == {"0": 1} and progress["processes"] == 2
    assert sorted(p.name for p in (Path(run) / "s0").glob("hidden*")) == ["hidden1.rank0.safetensors",
                                                                          "hidden1.rank1.safetensors"]
    proc, one = launch(tmp_path, "one", n=1, passes=passes, run_dir=run, resume=True)
    assert proc.returncode == 2 and "used 2 processes; resume it with that many, not 1" in _last_line(proc)
    proc, resumed = launch(tmp_path, "resumed", passes=passes, run_dir=run, resume=True)
    _ok(proc, resumed, 2)
    for k, v in whole[0]["state"].items():   # the same bytes as the run that was never cut
        assert torch.equal(v, resumed[0]["state"][k]) and torch.equal(v, resumed[1]["state"][k]), k
    def rows(r):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in r["report"]["layers"]]
    assert rows(resumed[0]) == rows(whole[0])   # the finished blocks' rows come back from the run folder


def test_python_m_compress_is_the_command_line():
    """What `torchrun -m compress run RECIPE` and `accelerate launch -m compress` start."""
    proc = subprocess.run([sys.executable, "-m", "compress", "passes"], capture_output=True, text=True, cwd=ROOT,
                          timeout=HANG)
    assert proc.returncode == 0 and "sparsegpt:" in proc.stdout
