"""MoE benchmark: ours against llm-compressor on SmolLM2-135M upcycled into a Mixtral (8 experts, top-2).

The model (benchmarks/moe_upcycle.py): every MLP of SmolLM2-135M copied into 8 experts,
each perturbed by 1 % of the matrix's std (--perturb), a seeded random router; attention,
norms, embeddings and the tied head copied exactly. Before anything else the script checks
that with --perturb 0 the upcycled model's perplexity equals SmolLM2's to 4 significant
digits (Mixtral renormalizes the top-2 weights, so identical experts compute the MLP) and
stops otherwise. The perturbed model is saved once (WORK/upcycled); both sides load it.

Protocol (as benchmarks/prune.py): calibration 128 x 512 tokens from the C4 train sample,
seed 0, the same ids for both sides; WikiText-2 test, seqlen 512, first 64 windows. Rows
(`--rows` takes their keys): dense; wanda50, wanda24 (Wanda 50 %, 2:4); sgpt50, sgpt24
(SparseGPT 50 %, 2:4); gptq4 (GPTQ W4 g64, our quant defaults: asymmetric, act-order with
static groups, MSE clipping; the peer is set up the same, benchmarks/peer_moe_llmcompressor.py).

Ours runs `compress.run(model, passes, calib=ids, moe_calibration="all" | "routed")` (the
keyword is passed only when compress.run has it; without it the routed column stays
empty). llm-compressor 0.14 linearizes the fused experts into per-expert nn.Linear and
calibrates with `moe_calibrate_all_experts=True`, which is our "all". Every compression
runs in a fresh subprocess: "seconds" is the compression call alone, "peak RSS" the whole
process (VmHWM, read right after the call). Every perplexity is computed here, by the same
code, on a freshly loaded upcycled model with the weights a worker saved swapped in;
packed layers (ours, GPTQ) are saved as their dequantized effective weights. Only if ours
packs a weight into a module whose effective weight cannot be read does our worker compute
that row's perplexity itself, with the same evaluate() on the same windows (the table
marks it "w"). "covered" is ours' report["coverage"] parameter fraction of the decoder
weights (the routers, never a target, keep it at 99.98 %; the target asks that nothing
else is left untouched); "experts changed" counts expert matrices (gate, up, down of
each expert) that differ from the upcycled model, ours / llm-compressor's.

A second table times SparseGPT 50 % and GPTQ on the MoE blocks batched (the default)
against looped: `--looped` makes our worker set COMPRESS_MOE_LOOP=1, which the engine
honours by running the experts one at a time. The targets are checked below the tables.

    python benchmarks/moe.py --data-dir ../shared/data [--nsamples 128] [--windows 64]
        [--rows dense,wanda50,wanda24,sgpt50,sgpt24,gptq4] [--modes all,routed] [--no-peer]
        [--no-looped] [--peer-python PATH] [--perturb 0.01] [--work DIR] [--reuse-model]
        [--keep-weights] [--add-rows] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))   # the repository root: `calib` and `compress`

from moe_report import tables, targets  # noqa: E402
from moe_upcycle import decoder_weights, dense_ppl, expert_stats, load_moe, prepare  # noqa: E402
from prune import WorkerFailed  # noqa: E402

ROWS = {  # key: (method, setting, our passes, the peer's arguments)
    "dense": ("dense", "—", None, None),
    "wanda50": ("Wanda", "50%", [{"wanda": {"sparsity": 0.5}}], ["--method", "wanda", "--sparsity", "0.5"]),
    "wanda24": ("Wanda", "2:4", [{"wanda": {"pattern": "2:4"}}], ["--method", "wanda", "--pattern", "2:4"]),
    "sgpt50": ("SparseGPT", "50%", [{"sparsegpt": {"sparsity": 0.5}}], ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "sgpt24": ("SparseGPT", "2:4", [{"sparsegpt": {"pattern": "2:4"}}], ["--method", "sparsegpt", "--pattern", "2:4"]),
    "gptq4": ("GPTQ", "W4 g64", [{"quant": {"bits": 4, "group_size": 64, "method": "gptq"}}],
              ["--method", "gptq", "--bits", "4", "--group-size", "64"]),
}
LOOPED = ("sgpt50", "gptq4")   # the rows timed batched against looped


def has_moe_keyword() -> bool:
    import compress
    return "moe_calibration" in inspect.signature(compress.run).parameters


def vmhwm_mib() -> float:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve (see benchmarks/prune.py)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def effective_weights(model, names: list[str]) -> tuple[dict, list[str]]:
    """{name: fp32 tensor} of the decoder weights after the run (a packed layer's
    dequantized effective weight), and the names no plain tensor could be read for."""
    import torch

    out, unreadable, fused = {}, [], {}
    with torch.no_grad():
        for name in names:
            mod_name, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                unreadable.append(name)
                continue
            if attr == "weight" and hasattr(mod, "effective_weight"):
                t = mod.effective_weight()
            elif callable(getattr(mod, "effective", None)):   # compress.nn's PackedExperts: {fused name: tensor}
                t = fused.setdefault(mod_name, mod.effective()).get(attr)
            else:
                t = getattr(mod, attr, None)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                out[name] = t.detach().float().cpu().contiguous()
            else:
                unreadable.append(name)
    return out, unreadable


def worker(a) -> None:
    """Subprocess: compress the upcycled model with one row's passes; save weights and measures."""
    if a.looped:   # the engine's switch to its per-expert loop (set before compress is imported)
        os.environ["COMPRESS_MOE_LOOP"] = "1"
    else:          # a batched row stays batched whatever the caller's environment says
        os.environ.pop("COMPRESS_MOE_LOOP", None)
    import torch
    from safetensors.torch import save_file

    import compress
    from compress.loading import load_model

    model, _ = load_model(a.model)
    names = decoder_weights(model)   # before the run: packing renames nothing, but may replace modules
    ids = torch.load(a.calib)
    kw = {"moe_calibration": a.mode} if has_moe_keyword() else {}
    t0 = time.perf_counter()
    _, report = compress.run(model, ROWS[a.row][2], calib=ids, batch_size=a.batch_size, **kw)
    seconds = time.perf_counter() - t0
    rss = vmhwm_mib()
    cov = report["coverage"]
    result = {"seconds": seconds, "peak_rss_mib": rss, "moe_calibration": kw.get("moe_calibration"),
              "looped": a.looped, "covered": cov["parameter_fraction"], "covered_weights": cov["weight_fraction"],
              "untouched": [f"{g['weights']} in {g['blocks']} blocks: {g['why']}" for g in cov["untouched"]],
              # routers are never a target: every other decoder weight must be compressed
              "uncovered": [g["weights"] for g in cov["untouched"] if not g["why"].startswith("router")],
              "sparsity": report["summary"]["sparsity"]}
    weights, unreadable = effective_weights(model, names)
    if unreadable:   # a runtime module we cannot read back: evaluate it here, on the same windows
        from compress.eval import evaluate

        result.update(ppl=evaluate(model, torch.load(a.windows_file), batch_size=8)["ppl"], unreadable=unreadable[:5])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "weights.safetensors"))
    (out / "result.json").write_text(json.dumps(result, indent=2))


def score(r: dict, folder: Path, windows, levels: bool, keep: bool) -> dict:
    """Perplexity (unless the worker had to compute it) and expert counts of a worker's weights."""
    from safetensors.torch import load_file

    from compress.eval import evaluate

    model = load_moe(folder)   # fresh: no row sees another's weights
    weights = load_file(r["weights"])
    r.update(expert_stats(model, weights, levels))
    missing = model.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys[:5]
    del weights
    if "ppl" in r:
        r["ppl_where"] = "worker"
    else:
        r["ppl"] = evaluate(model, windows, batch_size=8, desc="ppl")["ppl"]
    if not keep:   # 2.6 GB a row
        Path(r["weights"]).unlink()
    return r


def run_worker(cmd: list, out: Path, label: str) -> dict:
    """benchmarks/prune.py's run_worker, also naming the exit status (a signal leaves no traceback)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        how = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit status {res.returncode}"
        raise WorkerFailed(f"{label} failed ({how}):\n{res.stderr[-3000:]}")
    row = json.loads((out / "result.json").read_text())
    row["wall_process"] = time.perf_counter() - t0
    row["weights"] = str(out / "weights.safetensors")
    return row


def run_one(impl: str, key: str, mode: str, looped: bool, work: Path, a, windows) -> dict:
    tag = f"{impl}-{key}" + ("" if impl == "peer" else f"-{mode}") + ("-looped" if looped else "")
    out, folder = work / tag, work / "upcycled"
    common = ["--calib", str(work / "calib.pt"), "--out", str(out)]
    if impl == "ours":
        cmd = [sys.executable, __file__, "--worker", "--row", key, "--mode", mode, "--model", str(folder),
               "--windows-file", str(work / "windows.pt"), "--batch-size", str(a.batch_size)] + common
        cmd += ["--looped"] if looped else []
    else:
        cmd = [a.peer_python, str(HERE / "peer_moe_llmcompressor.py"), "--model", str(folder)] + ROWS[key][3] + common
    try:
        r = run_worker(cmd, out, f"{tag} ({ROWS[key][0]} {ROWS[key][1]})")
        r = score(r, folder, windows, key == "gptq4", a.keep_weights)
    except WorkerFailed as e:
        r = {"error": str(e.code)}
    except Exception:   # scoring this row's weights failed: say so, run the other rows
        import traceback
        r = {"error": f"{tag}: scoring failed:\n{traceback.format_exc()}"}
    if "error" in r:
        print(f"{tag:24s} FAILED: {r['error'][-1500:]}", flush=True)
    else:
        print(f"{tag:24s} ppl {r['ppl']:8.3f}  {r['seconds']:7.1f} s  {r['peak_rss_mib']:6.0f} MiB  experts changed "
              f"{r['experts_changed']}/{r['expert_matrices']}, zeros {r['expert_zeros']:.4f}"
              + (f", at most {r['expert_levels']} values per group of 64" if "expert_levels" in r else "")
              + (f", covered {100 * r['covered']:.2f} %" if "covered" in r else ""), flush=True)
    return r


def hold(work: Path):
    """An exclusive lock on WORK: two runs sharing it would overwrite each other's calibration
    ids, upcycled model and row folders."""
    import fcntl

    f = open(work / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another benchmarks/moe.py run is using {work}; wait for it or pass --work DIR") from None
    return f


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for hidden in ("--row", "--mode", "--model", "--calib", "--out", "--windows-file"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--looped", action="store_true", help="worker: set COMPRESS_MOE_LOOP=1 (per-expert loop)")
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated row keys (default: {','.join(ROWS)})")
    ap.add_argument("--modes", default="all,routed", help="our moe_calibration modes to run")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--perturb", type=float, default=0.01, help="expert perturbation, fraction of each matrix's std")
    ap.add_argument("--seed", type=int, default=0, help="seed of the router and the perturbation")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--no-looped", action="store_true", help="skip the batched-against-looped table")
    ap.add_argument("--peer-python", default=None, help="python of llm-compressor's venv (default: build it)")
    ap.add_argument("--work", default=str(HERE / ".cache" / "moe"))
    ap.add_argument("--reuse-model", action="store_true",
                    help="reuse WORK/upcycled when it was built (and checked) with the same settings")
    ap.add_argument("--add-rows", action="store_true",
                    help="keep the rows WORK/rows.json already holds and add (or redo) the --rows given")
    ap.add_argument("--keep-weights", action="store_true", help="keep each row's saved weights (2.6 GB each)")
    ap.add_argument("--markdown", help="also write the output (tables, targets) to this file")
    a = ap.parse_args(argv)
    a.rows = [k.strip() for k in a.rows.split(",") if k.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [k for k in a.rows if k not in ROWS] + [m for m in a.modes if m not in ("all", "routed")]
    if bad or not a.rows or not a.modes:
        ap.error(f"unknown row or mode {', '.join(bad) or '(none given)'}; rows: {', '.join(ROWS)}; modes: all, routed")
    return a


def main() -> None:
    a = parse()
    if a.worker:
        return worker(a)
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lock = hold(work)  # noqa: F841  (held until the process ends)
    modes = a.modes if has_moe_keyword() else ["all"]   # without the keyword "routed" would rerun "all"
    if modes != a.modes:
        print("compress.run has no moe_calibration keyword yet: running ours once (engine default), "
              "the routed column stays empty", flush=True)
    folder, windows, check = prepare(a, work)
    if not a.no_peer and not a.peer_python:
        setup = subprocess.run(["bash", str(HERE / "setup_peer.sh")], capture_output=True, text=True, check=True)
        a.peer_python = setup.stdout.strip().splitlines()[-1]
    saved = work / "rows.json"
    rows: dict = json.loads(saved.read_text()) if a.add_rows and saved.exists() else {}
    for key in a.rows:
        if key == "dense":
            rows[key] = {"ours_all": dense_ppl(folder, windows)}
            print(f"dense (upcycled, perturbed) ppl {rows[key]['ours_all']['ppl']:.3f}", flush=True)
            continue
        row = {f"ours_{m}": run_one("ours", key, m, False, work, a, windows) for m in modes}
        if not a.no_peer:
            row["peer"] = run_one("peer", key, "all", False, work, a, windows)
        if key in LOOPED and not a.no_looped:
            row["looped"] = run_one("ours", key, "all", True, work, a, windows)
        rows[key] = row
        (work / "rows.json").write_text(json.dumps(rows, indent=2))   # after every row: a killed run keeps them
    text = (f"SmolLM2-135M upcycled to Mixtral {a.experts} experts top-{a.top_k}, perturbation {a.perturb} std, "
            f"seed {a.seed} (check: SmolLM2 ppl {check['dense_ppl']:.4g}, unperturbed upcycle "
            f"{check['unperturbed_ppl']:.4g}); calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; "
            f"WikiText-2 test, seqlen 512, {windows.shape[0]} windows; {os.cpu_count()} CPU cores; torch "
            f"{torch.__version__}; moe_calibration keyword: {'yes' if has_moe_keyword() else 'not in compress.run yet'}"
            f"\n\n{tables(ROWS, rows)}\n\n{targets(ROWS, rows)}")
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
