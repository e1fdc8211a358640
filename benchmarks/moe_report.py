"""The tables and the targets check of benchmarks/moe.py.

`rows` is {row key: {"ours_all", "ours_routed", "peer", "looped": result}}, a result
being a worker's result.json plus what the parent measured ("ppl", "experts_changed",
"expert_matrices", ...) or {"error": text}. `ROWS` is moe.py's {key: (method, setting, ...)}.
"""
from __future__ import annotations


def _f(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _get(r: dict | None, k: str):
    return None if not r or "error" in r else r.get(k)


def _ppl(r: dict | None) -> str:
    if r and "error" in r:
        return "failed"
    v = _get(r, "ppl")
    return _f(v, ".3f") + (" w" if r and r.get("ppl_where") == "worker" else "")


def _changed(r: dict | None) -> str:
    n, of = _get(r, "experts_changed"), _get(r, "expert_matrices")
    return "—" if n is None else f"{n}/{of}"


def main_table(ROWS: dict, rows: dict) -> str:
    lines = ["| method | setting | ours ppl (all) | ours ppl (routed) | llm-compressor ppl | ours s | llm-compressor s "
             "| ours peak RSS MiB | llm-compressor peak RSS MiB | ours covered | experts changed ours / llm-compressor |",
             "|" + "---|" * 11]
    for key, row in rows.items():
        o, p = row.get("ours_all"), row.get("peer")
        cov = _get(o, "covered")
        lines.append(f"| {ROWS[key][0]} | {ROWS[key][1]} | {_ppl(o)} | {_ppl(row.get('ours_routed'))} | {_ppl(p)} | "
                     f"{_f(_get(o, 'seconds'), '.1f')} | {_f(_get(p, 'seconds'), '.1f')} | "
                     f"{_f(_get(o, 'peak_rss_mib'), '.0f')} | {_f(_get(p, 'peak_rss_mib'), '.0f')} | "
                     f"{'—' if cov is None else format(100 * cov, '.2f') + ' %'} | {_changed(o)} / {_changed(p)} |")
    return "\n".join(lines)


def loop_table(ROWS: dict, rows: dict) -> str:
    lines = ["| method | setting | batched s | looped s | looped / batched |", "|" + "---|" * 5]
    for key, row in rows.items():
        if "looped" not in row:
            continue
        b, lo = _get(row.get("ours_all"), "seconds"), _get(row["looped"], "seconds")
        lines.append(f"| {ROWS[key][0]} | {ROWS[key][1]} | {_f(b, '.1f')} | {_f(lo, '.1f')} | "
                     f"{_f(lo / b if b and lo else None, '.2f')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def tables(ROWS: dict, rows: dict) -> str:
    notes = ("ours s / peak RSS / covered: moe_calibration \"all\" (llm-compressor: calibrate_all_experts); "
             "\"w\": perplexity computed in our worker (a packed module whose weights this script cannot read). "
             "experts changed: expert matrices (gate, up, down per expert) that differ from the upcycled model.")
    loops = loop_table(ROWS, rows)
    text = main_table(ROWS, rows) + "\n\n" + notes
    return text + ("\n\nOurs on the MoE blocks, batched (default) against looped (COMPRESS_MOE_LOOP=1):\n\n"
                   + loops if loops else "")


def _verdict(text: str, checks: list[tuple[str, bool, str]], need: str) -> str:
    if not checks:
        return f"- {text}: n/a (needs {need})"
    ok = all(c[1] for c in checks)
    detail = "; ".join(f"{label}: {d} {'ok' if good else 'FAIL'}" for label, good, d in checks)
    return f"- {text}: {'PASS' if ok else 'FAIL'} ({detail})"


def targets(ROWS: dict, rows: dict) -> str:
    label = lambda k: f"{ROWS[k][0]} {ROWS[k][1]}"  # noqa: E731
    cover, ppl, speed, loop, mem = [], [], [], [], []
    for k, row in rows.items():
        if k == "dense":
            continue
        for mode in ("all", "routed"):
            r = row.get(f"ours_{mode}")
            if _get(r, "covered") is not None:
                left = r.get("uncovered", [])
                cover.append((f"{label(k)} {mode}", not left,
                              f"{100 * r['covered']:.2f} %" + (f", untouched {', '.join(left)}" if left else "")))
        o, p = row.get("ours_all"), row.get("peer")
        if _get(o, "ppl") is not None and _get(p, "ppl") is not None:
            ppl.append((label(k), o["ppl"] <= 1.02 * p["ppl"], f"{o['ppl']:.3f} vs {p['ppl']:.3f}"))
        if _get(o, "seconds") and _get(p, "seconds"):
            speed.append((label(k), o["seconds"] <= 0.5 * p["seconds"], f"{o['seconds'] / p['seconds']:.2f}x"))
        if _get(o, "peak_rss_mib") and _get(p, "peak_rss_mib"):
            mem.append((label(k), o["peak_rss_mib"] <= p["peak_rss_mib"],
                        f"{o['peak_rss_mib']:.0f} vs {p['peak_rss_mib']:.0f} MiB"))
        lo = _get(row.get("looped"), "seconds")
        if lo and _get(o, "seconds"):
            loop.append((label(k), lo >= 3 * o["seconds"], f"{lo / o['seconds']:.2f}x"))
    return "\n".join(["Targets:", "",
                      _verdict("every decoder weight covered, routers aside (ours, each row and mode)", cover, "our rows"),
                      _verdict("ours ppl (all) within 2 % of llm-compressor or better, per algorithm", ppl,
                               "rows of both sides"),
                      _verdict("ours seconds <= 0.5x llm-compressor's", speed, "rows of both sides"),
                      _verdict("batched >= 3x faster than looped (SparseGPT, GPTQ)", loop, "the looped rows"),
                      _verdict("ours peak RSS <= llm-compressor's", mem, "rows of both sides")])
