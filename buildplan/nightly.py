"""The nightly report: what was built, what was up to date, what failed and why (JSON + HTML)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from buildplan.files import atomic_write, utc_now
from buildplan.plan import Plan
from buildplan.state import Store


def _status(store: Store, node, started: str, skipped: dict[str, str]) -> dict:
    rec, failure = store.read(node.id), store.read_failure(node.id)
    target = node.labels.get("target")
    if failure and failure["at"] >= started:
        return {"status": "failed", "reason": failure["error"], "log": failure["log"]}
    if rec and store.is_fresh(node):
        st = "built" if rec["finished_at"] >= started else "up to date"
        return {"status": st, "figures": rec.get("figures"), "size": sum(o["size"] for o in rec["outputs"].values()),
                "duration_s": rec["duration_s"], "tool_peak_rss_mb": rec.get("tool_peak_rss_mb"), "log": rec.get("log"),
                "standin": rec.get("standin", False)}
    if target in skipped:
        return {"status": "skipped", "reason": skipped[target]}
    return {"status": "skipped", "reason": "an upstream artifact failed"}


def write_report(plan: Plan, started: str, skipped: dict[str, str], report_dir: str | None,
                 damaged: dict | None = None) -> tuple[Path, int]:
    store = Store(plan)
    rows = []
    for node in plan.nodes.values():
        rows.append({"node": node.id, "stage": node.stage, "model": node.model, "labels": node.labels,
                     "output": node.main_output, **_status(store, node, started, skipped)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    doc = {"started": started, "finished": utc_now(), "config": plan.config.path, "summary": counts,
           "skipped_targets": skipped, "verify_damaged": damaged or {}, "artifacts": rows}
    out_dir = Path(report_dir or Path(plan.root) / "reports")
    stem = out_dir / f"nightly-{started[:19].replace(':', '')}"
    atomic_write(f"{stem}.json", json.dumps(doc, indent=1))
    atomic_write(f"{stem}.html", render_html(doc, Path(plan.root), out_dir))
    return stem, counts.get("failed", 0)


def _fig(figures) -> str:
    if not figures:
        return ""
    flat = []
    for k, v in figures.items():
        if isinstance(v, dict) and "max_abs" in v:
            flat.append(f"{k}: max|Δ| {v['max_abs']:.2e}, cos {v['cosine']:.6f}")
        elif isinstance(v, list):
            flat += [f"{s['compared']}: " + (f"cos {s['cosine']}" if "cosine" in s else f"{s.get('tensors')} tensors compared")
                     for s in v if isinstance(s, dict) and "compared" in s]
        elif isinstance(v, dict):
            flat.append(f"{k}: " + ", ".join(f"{kk} {vv}" for kk, vv in v.items())[:160])
    return "<br>".join(html.escape(x) for x in flat)


def render_html(doc: dict, root: Path, out_dir: Path) -> str:
    e = html.escape
    tables: dict[str, list[dict]] = {}
    for r in doc["artifacts"]:
        tables.setdefault(r["labels"].get("target") or f"export ({r['model']})", []).append(r)
    colors = {"built": "#d4f7d4", "up to date": "#eef", "failed": "#fbb", "skipped": "#eee"}
    parts = [f"<!doctype html><meta charset=utf-8><title>Nightly {e(doc['started'])}</title>",
             "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
             "table{border-collapse:collapse;margin-bottom:18px}</style>",
             f"<h1>Nightly build {e(doc['started'])}</h1><p>config {e(doc['config'])}; finished {e(doc['finished'])}</p>",
             "<p><b>Summary:</b> " + ", ".join(f"{e(k)}: {v}" for k, v in sorted(doc["summary"].items())) + "</p>"]
    for t, why in doc["skipped_targets"].items():
        parts.append(f"<p>skipped target <b>{e(t)}</b>: {e(why)}</p>")
    for name, rows in sorted(tables.items()):
        parts.append(f"<h2>{e(name)}</h2><table><tr><th>artifact</th><th>graph</th><th>batch</th><th>precision</th>"
                     "<th>status</th><th>validation</th><th>size</th><th>time (s)</th><th>log</th></tr>")
        for r in rows:
            lab = r["labels"]
            status = r["status"] + (" (stand-in, not a real compile)" if r.get("standin") else "")
            if r.get("reason"):
                status += f": {r['reason'].splitlines()[0][:200]}"
            log = ""
            if r.get("log"):
                href = Path(r["log"]) if Path(r["log"]).is_absolute() else root / r["log"]
                log = f"<a href='{e(str(href))}'>log</a>"
            size = f"{r['size'] / 1e6:.2f} MB" if r.get("size") else ""
            parts.append(f"<tr style='background:{colors[r['status']]}'><td>{e(r['output'])}</td>"
                         f"<td>{e(str(lab.get('graph', '')))}</td><td>{e(str(lab.get('batch', '')))}</td>"
                         f"<td>{e(str(lab.get('precision', '')))}</td><td>{e(status)}</td><td>{_fig(r.get('figures'))}</td>"
                         f"<td>{size}</td><td>{r.get('duration_s', '')}</td><td>{log}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)
