"""Issue 23's table (`python benchmarks/prune.py --allocation`): per-block sparsity
allocations on SmolLM2-135M under the engine protocol of benchmarks/prune.py.

Each (method, sparsity) row runs ours with allocation uniform, owl (M 5, lambda 0.08, the
paper's LLaMA values) and budget, and llm-compressor 0.14's OWL with the same M and
lambda (benchmarks/peer_llmcompressor.py --owl: its OWL math, with two bugs of 0.14
worked around; no DSnoT there, so its Wanda + DSnoT cell is empty). Every compression
runs in a fresh subprocess; seconds are the compression call alone. Rows are saved to
WORK/allocation.json after each run, and --reuse takes the runs already there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prune import perplexity, run_row, start

RUNS = [("ours", "uniform"), ("ours", "owl"), ("peer", "owl"), ("ours", "budget")]


def rows_of(a) -> list[tuple[str, str]]:
    methods = (a.methods or "wanda,sparsegpt,wanda+dsnot").split(",")
    settings = (a.settings or "60%,70%").split(",")
    return [(m, s) for s in settings for m in methods if not ("dsnot" in m and s != "70%")]   # the issue's rows


def table(results: dict, keys: list) -> str:
    fmt = lambda r, k, f: "—" if not r or r.get(k) is None else format(r[k], f)  # noqa: E731
    lines = ["| method | sparsity | uniform ppl | OWL ppl (ours) | OWL ppl (llm-compressor) | budget ppl (ours) | "
             "seconds: uniform / OWL / budget (ours), OWL (llm-compressor) |", "|" + "---|" * 7]
    for m, s in keys:
        r = {run: results.get(f"{m}|{s}|{run[0]}|{run[1]}") for run in RUNS}
        secs = " / ".join(fmt(r[("ours", x)], "seconds", ".1f") for x in ("uniform", "owl", "budget"))
        lines.append(f"| {m} | {s} | {fmt(r[('ours', 'uniform')], 'ppl', '.2f')} | {fmt(r[('ours', 'owl')], 'ppl', '.2f')} "
                     f"| {fmt(r[('peer', 'owl')], 'ppl', '.2f')} | {fmt(r[('ours', 'budget')], 'ppl', '.2f')} | "
                     f"{secs}, {fmt(r[('peer', 'owl')], 'seconds', '.1f')} |")
    return "\n".join(lines)


def targets(results: dict, keys: list) -> str:
    def get(m, s, impl, alloc):
        return (results.get(f"{m}|{s}|{impl}|{alloc}") or {}).get("ppl")

    def verdict(pairs):   # [(a, b)] must all have a <= b
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        return "n/a" if not pairs else ("PASS" if all(x <= y for x, y in pairs) else "FAIL")

    base = [(m, s) for m, s in keys if "dsnot" not in m]
    seventy = [(m, s) for m, s in base if s == "70%"]
    slow = [((results.get(f"{m}|{s}|ours|{x}") or {}).get("seconds"),
             1.1 * ((results.get(f"{m}|{s}|ours|uniform") or {}).get("seconds") or float("nan")))
            for m, s in keys for x in ("owl", "budget")]
    return "\n".join([
        "Targets of the issue:", "",
        "- our OWL within 2 % of llm-compressor's OWL, or better: "
        + verdict([(get(m, s, "ours", "owl"), 1.02 * get(m, s, "peer", "owl")) for m, s in base
                   if get(m, s, "peer", "owl") is not None]),
        "- OWL below uniform at 70 %: " + verdict([(get(m, s, "ours", "owl"), get(m, s, "ours", "uniform"))
                                                   for m, s in seventy]),
        "- budget below OWL at 60 % and 70 %: " + verdict([(get(m, s, "ours", "budget"), get(m, s, "ours", "owl"))
                                                         for m, s in base]),
        "- at most 10 % added to the uniform run's wall time: " + verdict([p for p in slow if p[1] == p[1]]),
    ])


def main(a) -> None:
    work, (model, windows, dense_state) = start(a)
    store = work / "allocation.json"
    results = json.loads(store.read_text()) if a.reuse and store.exists() else {}
    keys = rows_of(a)
    for m, s in keys:
        for impl, alloc in RUNS:
            key = f"{m}|{s}|{impl}|{alloc}"
            if key in results or (impl == "peer" and (a.no_peer or m not in ("wanda", "sparsegpt"))):
                continue
            r = run_row(impl, m, s, work, a, alloc)
            r["ppl"] = perplexity(model, dense_state, r["weights"], windows)
            results[key] = r
            store.write_text(json.dumps(results, indent=2))
            print(f"{impl:5s} {m:12s} {s:4s} {alloc:8s} ppl {r['ppl']:9.2f}  {r['seconds']:7.1f} s", flush=True)
    text = (f"SmolLM2-135M; calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; WikiText-2 test, "
            f"seqlen 512, {windows.shape[0]} windows; {os.cpu_count()} CPU cores\n\n"
            f"{table(results, keys)}\n\n{targets(results, keys)}")
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
