"""What the table benchmarks share (benchmarks/quant.py, benchmarks/armor.py): each row
is a list of passes run by `compress.run` in a fresh subprocess on SmolLM2-135M, under
the engine protocol of benchmarks/prune.py (whose pieces this imports).

A worker records the compression seconds (the call alone), the peak RSS of the whole
process (VmHWM), and, over the targeted decoder linear layers: bits per weight counting
everything stored (packed modules: sum storage_bits() / sum in*out; plain linears: 16),
the fraction of zero weights, whether the effective weights are still exact 2:4, and
(ARMOR) the extra parameters in %. It saves the effective weights; every perplexity is
computed in the parent, from the dense model with them swapped in. Below the table the
suite's targets are checked.

A suite is a module with ROWS {key: (label, passes[, compress.run options])}, TARGETS [(text, keys, check)],
NOTE, NAME (its cache folder) and a docstring, whose `__main__` calls `main(suite)`. The option "start": KEY
continues from the model row KEY saved (WORK/KEY/model; its seconds are added), so rows that differ only in
their last passes share the work before them.
A suite may add EVAL(model, args) -> {field: value}, called with the row's weights in
the model after its perplexity, and ARGS [(flag, argparse keywords)], options of its own.
A suite with PEER {key: [arguments of benchmarks/peer_llmc_quant.py]} also runs those
rows with llm-compressor in its own venv (benchmarks/setup_peer.sh), in the same run,
on the same calibration ids: "peer_ppl", "peer_seconds", "peer_rss_mib" in the row; on a
2:4 row also "peer_exact_24", "peer_zeros" and, where its weights are not 2:4, "peer_ppl_24"
(`peer_24`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# prune.py also puts the repository root on sys.path (for `calib` and `compress`).
from prune import WorkerFailed, perplexity, prepare, run_worker, save_worker_output  # noqa: E402


def is_24(passes) -> bool:
    return any(str(args.get("pattern", "")).replace(" ", "") == "2:4" for e in passes for args in e.values())


def unavailable(passes) -> str | None:
    """Why this checkout cannot run these passes (None: it can). Imports compress/passes/NAME.py
    when the registry lacks NAME (a pass not yet listed in compress/passes/__init__.py)."""
    import compress.passes  # noqa: F401  (registers the listed passes)
    from compress.passes.base import REGISTRY

    for entry in passes:
        for name in entry:
            if name in REGISTRY:
                continue
            try:
                importlib.import_module(f"compress.passes.{name}")
            except ModuleNotFoundError as e:
                if e.name == f"compress.passes.{name}":
                    return f"pass {name!r} does not exist in this checkout yet (no compress/passes/{name}.py)"
                return f"compress/passes/{name}.py does not import: {e}"
            except Exception as e:  # a pass being written: say what is wrong, run the other rows
                return f"compress/passes/{name}.py does not import: {type(e).__name__}: {e}"
            if name not in REGISTRY:
                return f"compress/passes/{name}.py registers no pass {name!r}"
    return None


def measure(modules: dict, check_24: bool):
    """Effective weights {name.weight: fp32 [out, in]} of the linears `modules` {name: module}
    and their bits per weight, zero fraction and (check_24) exact-2:4 flag."""
    import torch

    from compress.masks import follows_nm
    from compress.nn.base import PackedLinear

    weights, bits, numel, zeros, exact, extra = {}, 0, 0, 0, True, 0
    with torch.no_grad():
        for name, m in modules.items():
            packed = isinstance(m, PackedLinear)
            W = (m.effective_weight() if packed else m.weight).detach().float().cpu().contiguous()
            weights[f"{name}.weight"] = W
            bits += m.storage_bits() if packed else 16 * W.numel()
            numel += W.numel()
            extra += m.extra_parameters() if hasattr(m, "extra_parameters") else 0   # ARMOR's A and B
            zeros += int((W == 0).sum())
            if check_24:
                exact &= follows_nm(W, 2, 4)
    stats = {"layers": len(modules), "bits_per_weight": bits / numel, "zeros": zeros / numel,
             "exact_24": exact if check_24 else None, "extra_params_pct": 100 * extra / numel}
    return weights, stats


def worker(suite, a) -> None:
    """Subprocess: compress SmolLM2 with one row's passes; save effective weights and measures."""
    import torch

    import compress
    from compress.loading import load_model

    passes = suite.ROWS[a.row][1]
    options = dict(suite.ROWS[a.row][2]) if len(suite.ROWS[a.row]) > 2 else {}   # compress.run's runner options
    start = options.pop("start", None)
    why = unavailable(passes)
    if why:
        raise SystemExit(why)
    from calib import CalibConfig

    work, before = Path(a.out).parent, 0.0
    if start:   # continue from the model row `start` saved; its seconds count as ours
        model, tok = compress.load(str(work / start / "model"), dtype=torch.float32)
        before = json.loads((work / start / "result.json").read_text())["seconds"]
    else:
        model, tok = load_model("smollm2-135m")
    ids = torch.load(a.calib)
    calib_cfg = CalibConfig(source="c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)  # what `prepare` drew
    t0 = time.perf_counter()
    _, report = compress.run(model, passes, calib=ids, tokenizer=tok, calib_config=calib_cfg, batch_size=a.batch_size,
                             **options)
    seconds = time.perf_counter() - t0 + before
    if any(len(r) > 2 and r[2].get("start") == a.row for r in suite.ROWS.values()):   # a start of other rows
        compress.save(str(Path(a.out) / "model"), model, tok, report=report)
    layers = [r["layer"] for r in report["layers"]]
    if start:   # the start's layers: what its run compressed
        layers = [r["layer"] for r in json.loads((work / start / "model" / "report.json").read_text())["layers"]]
    targeted = {n: model.get_submodule(n) for n in dict.fromkeys(layers)}
    weights, stats = measure(targeted, is_24(passes))
    weights.update({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                    if "norm" in k and k not in weights})   # AWQ folds its scales into the norms
    for name, tr in (report.get("training") or {}).items():  # PERP: its norms (and biases) changed too
        weights.update({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                        if ("norm" in k or k.endswith(".bias")) and k not in weights})
        stats.update({k: tr[k] for k in ("trainable_pct", "steps", "tokens")}, train_seconds=tr["seconds"])
    save_worker_output(Path(a.out), weights, {"seconds": seconds, **stats})


def dense_row(model) -> dict:
    from compress.models import block_linears, find_blocks

    prefix, blocks = find_blocks(model)
    linears = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}
    return measure(linears, False)[1]


def table(suite, rows: dict) -> str:
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    extra = getattr(suite, "EXTRA", [])  # [(header, result key, format)] after the fixed columns
    base = getattr(suite, "GAP_TO", None)   # a row key: "gap to dense / its gap" as a column
    if base and "ppl" in rows.get(base, {}) and "ppl" in rows.get("dense", {}):
        dense, gap = rows["dense"]["ppl"], rows[base]["ppl"] - rows["dense"]["ppl"]
        for r in rows.values():
            r["gap_ratio"] = (r["ppl"] - dense) / gap if "ppl" in r else None
        extra = [(f"gap to dense ÷ {suite.ROWS[base][0]}'s", "gap_ratio", ".3f"), *extra]
    lines = ["| row | key | ppl | seconds | peak RSS MiB | bits/weight | zero fraction | 2:4 exact | extra params % |"
             + "".join(f" {h} |" for h, _, _ in extra), "|" + "---|" * (9 + len(extra))]
    for key, r in rows.items():
        ppl = "failed" if "error" in r else fmt(r.get("ppl"), ".2f")
        exact = {True: "yes", False: "no", None: "—"}[r.get("exact_24")]
        lines.append(f"| {suite.ROWS[key][0]} | `{key}` | {ppl} | {fmt(r.get('seconds'), '.1f')} | "
                     f"{fmt(r.get('peak_rss_mib'), '.0f')} | {fmt(r.get('bits_per_weight'), '.3f')} | "
                     f"{fmt(r.get('zeros'), '.4f')} | {exact} | {fmt(r.get('extra_params_pct'), '.2f')} |"
                     + "".join(f" {fmt(r.get(k), f)} |" for _, k, f in extra))
    return "\n".join(lines)


def targets(suite, rows: dict) -> str:
    lines = ["Targets of the issue:", ""]
    for text, need, check in suite.TARGETS:
        missing = [k for k in need if "ppl" not in rows.get(k, {})]
        verdict = f"n/a (needs rows {', '.join(missing)})" if missing else ("PASS" if check(rows) else "FAIL")
        lines.append(f"- {text}: {verdict}")
    return "\n".join(lines)


def run_peer(suite, key: str, work: Path, a, model, dense_state, windows) -> dict:
    """llm-compressor's run of row `key` (suite.PEER): its perplexity, seconds and peak RSS."""
    if not a.peer_python:
        import subprocess
        setup = subprocess.run(["bash", str(HERE / "setup_peer.sh")], capture_output=True, text=True, check=True)
        a.peer_python = setup.stdout.strip().splitlines()[-1]
    out = work / f"peer-{key}"
    cmd = [a.peer_python, str(HERE / "peer_llmc_quant.py"), *suite.PEER[key], "--calib", str(work / "calib.pt"),
           "--out", str(out)]
    try:
        p = run_worker(cmd, out, f"llm-compressor {key}")
    except WorkerFailed as e:
        print(f"{key:13s} llm-compressor FAILED: {str(e.code)[-600:]}", flush=True)
        return {"peer_error": str(e.code)[-600:]}
    ppl = perplexity(model, dense_state, p["weights"], windows)
    print(f"{key:13s} llm-compressor ppl {ppl:8.2f}  {p['seconds']:6.1f} s", flush=True)
    r = {"peer_ppl": ppl, "peer_seconds": p["seconds"], "peer_rss_mib": p["peak_rss_mib"]}
    if is_24(suite.ROWS[key][1]):
        r.update(peer_24(model, dense_state, p["weights"], windows, out))
        print(f"{key:13s} llm-compressor exact 2:4: {r['peer_exact_24']}, zeros {r['peer_zeros']:.4f}"
              + (f", projected onto 2:4: ppl {r['peer_ppl_24']:.2f}" if "peer_ppl_24" in r else ""), flush=True)
    return r


def peer_24(model, dense_state, weights_file, windows, out: Path) -> dict:
    """llm-compressor's weights of a 2:4 row: whether they are still exact 2:4 and their zero
    fraction. Where they are not (its GPTQ updates every weight, pruned ones included, and
    rounds them to the grid's nonzero values), also the perplexity of their projection back
    onto 2:4, the two largest |w| of every four consecutive inputs kept: the 2:4 model that
    its run gives to deploy ("peer_ppl_24")."""
    from safetensors.torch import load_file, save_file

    from compress.masks import follows_nm, nm_mask

    weights = load_file(weights_file)
    linears = {k: v for k, v in weights.items() if v.dim() == 2}
    exact = all(follows_nm(v, 2, 4) for v in linears.values())
    zeros = sum(int((v == 0).sum()) for v in linears.values()) / sum(v.numel() for v in linears.values())
    r = {"peer_exact_24": exact, "peer_zeros": zeros}
    if not exact:
        weights.update({k: v * nm_mask(v.abs(), 2, 4) for k, v in linears.items()})
        save_file(weights, str(out / "weights_24.safetensors"))
        r["peer_ppl_24"] = perplexity(model, dense_state, out / "weights_24.safetensors", windows)
    return r


def main(suite) -> None:
    """The command line of a suite module (ROWS, TARGETS, NOTE, NAME, __doc__, __file__)."""
    ROWS = suite.ROWS
    ap = argparse.ArgumentParser(description=suite.__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated row keys (default: all of {','.join(ROWS)})")
    ap.add_argument("--work", default=str(HERE / ".cache" / suite.NAME))
    ap.add_argument("--markdown", help="also write the output (note, table, targets) to this file")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor (suites with PEER)")
    ap.add_argument("--peer-python", default=None, help="python of llm-compressor's venv (default: build it)")
    ap.add_argument("--reuse", action="store_true",
                    help="take rows already in WORK/rows.json (same protocol) instead of running them again")
    ap.add_argument("--peer-only", action="store_true",
                    help="with --reuse: run llm-compressor's side of the rows again, ours taken from WORK/rows.json")
    for flag, kwargs in getattr(suite, "ARGS", []):   # the suite's own options
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args()
    if a.worker:
        return worker(suite, a)
    keys = [k.strip() for k in a.rows.split(",") if k.strip()]
    bad = [k for k in keys if k not in ROWS]
    if bad or not keys:
        raise SystemExit(f"--rows: unknown row {', '.join(bad) or '(none given)'}; valid rows: {', '.join(ROWS)}")
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(keys):   # a row that continues another needs that row's model first
        start = ROWS[k][2].get("start") if len(ROWS[k]) > 2 else None
        if start and start not in keys[:i] and not (work / start / "model" / "config.json").exists():
            raise SystemExit(f"--rows: row {k} continues from row {start}, whose model is not in {work}; "
                             f"list {start} before {k}")
    skip = {k: why for k in keys if (why := unavailable(ROWS[k][1]))}
    for k, why in skip.items():
        print(f"row {k} will fail: {why}", flush=True)
    model, windows, dense_state = prepare(a, work)
    protocol = {"nsamples": a.nsamples, "seqlen": a.seqlen, "windows": int(windows.shape[0])}
    saved = json.loads((work / "rows.json").read_text()) if (work / "rows.json").exists() else {}
    if saved.get("protocol") != protocol:
        saved = {"protocol": protocol, "rows": {}}
    rows: dict = {}
    for key in keys:
        label, passes = ROWS[key][:2]
        if a.reuse and "ppl" in saved["rows"].get(key, {}):
            rows[key] = saved["rows"][key]
            print(f"{key:13s} reused from {work / 'rows.json'}", flush=True)
            peer_file = work / f"peer-{key}" / "weights.safetensors"
            if is_24(passes) and "peer_ppl" in rows[key] and "peer_exact_24" not in rows[key] and peer_file.exists():
                rows[key].update(peer_24(model, dense_state, peer_file, windows, peer_file.parent))   # a row from before
                (work / "rows.json").write_text(json.dumps(saved, indent=2))
            if not (a.peer_only and key in getattr(suite, "PEER", {})):
                continue
            r = {k: v for k, v in rows[key].items() if not k.startswith("peer_")}
            rows[key] = saved["rows"][key] = {**r, **run_peer(suite, key, work, a, model, dense_state, windows)}
            (work / "rows.json").write_text(json.dumps(saved, indent=2))
            continue
        if key == "dense":
            r = {**dense_row(model), "ppl": perplexity(model, dense_state, None, windows)}
        elif key in skip:
            r = {"error": skip[key]}
        else:
            out = work / key
            cmd = [sys.executable, suite.__file__, "--worker", "--row", key, "--calib", str(work / "calib.pt"),
                   "--out", str(out), "--batch-size", str(a.batch_size), "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen)]
            try:
                r = run_worker(cmd, out, f"row {key} ({label})")
                r["ppl"] = perplexity(model, dense_state, r["weights"], windows)
            except WorkerFailed as e:
                r = {"error": str(e.code)}
        if "error" not in r and hasattr(suite, "EVAL"):   # the model holds the row's weights now
            r.update(suite.EVAL(model, a))
        if key in getattr(suite, "PEER", {}) and not a.no_peer:
            r.update(run_peer(suite, key, work, a, model, dense_state, windows))
        rows[key] = r
        saved["rows"][key] = {k: v for k, v in r.items() if k != "weights"}
        (work / "rows.json").write_text(json.dumps(saved, indent=2))  # after every row: a crash keeps the rest
        if "error" in r:
            print(f"{key:13s} FAILED: {r['error']}", flush=True)
        else:
            print(f"{key:13s} ppl {r['ppl']:8.2f}  {r.get('seconds', 0):6.1f} s  {r.get('peak_rss_mib', 0):5.0f} MiB  "
                  f"{r['bits_per_weight']:6.3f} bits/w  zeros {r['zeros']:.4f}", flush=True)
    text = (f"SmolLM2-135M; calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; WikiText-2 test, "
            f"seqlen 512, {windows.shape[0]} windows; {os.cpu_count()} CPU cores; torch {torch.__version__}\n\n"
            f"{suite.NOTE}\n\n{table(suite, rows)}\n\n{targets(suite, rows)}")
    failed = [f"- `{k}`: {r['error'].strip().splitlines()[-1]}" for k, r in rows.items() if "error" in r]
    if failed:
        text += "\n\nFailed rows:\n\n" + "\n".join(failed)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


