"""The nightly report: a dashboard a deployment engineer reads at a glance, and its history.

Each night appends one line to `<reports>/history.jsonl` (per artifact: status, time, size,
peak memory, accuracy) and writes `nightly-<time>.json` and `.html`, plus `index.html` listing
every night. The HTML is self-contained (inline CSS and SVG, no script, no network): first the
failures with their error line and log, then per model a matrix (rows graph x batch size,
columns target x precision) of coloured cells, then per artifact the trends over the last
nights as small charts, with regressions flagged.
"""
from __future__ import annotations

import html
import json
import os
import statistics
from pathlib import Path

from buildplan.files import REPORTS_DIR, atomic_write, utc_now
from buildplan.plan import Plan
from buildplan.records import acceptance_figure
from buildplan.state import Store

NIGHTS_SHOWN = 14
# A figure is a regression when it is worse than the median of the previous nights (at least
# two) by this margin: (metric, record field, worse when higher, relative margin, absolute floor).
TRENDS = (
    ("build time", "duration_s", True, 0.5, 2.0),
    ("size", "size", True, 0.10, 0),
    ("peak memory", "peak_mb", True, 0.25, 50),
    ("1 - cosine", "one_minus_cosine", True, 1.0, 1e-4),
)
STATUS_COLOURS = {"built": "#b7e4b0", "up to date": "#dbe8f6", "failed": "#f4a3a3", "skipped": "#e3e3e3",
                  "not declared": "#ffffff"}
COMPILE_STAGES_LAST = ("transform", "calibrate")  # steps of a bmodel, not artifacts of their own in the matrix


def _status(store: Store, node, started: str, skipped: dict[str, str]) -> dict:
    rec, failure = store.record(node.id), store.read_failure(node.id)
    target = node.labels.get("target")
    if failure and failure["at"] >= started:
        return {"status": "failed", "reason": failure["error"], "log": failure["log"]}
    if rec and store.is_fresh(node):
        st = "built" if (rec.finished_at or "") >= started else "up to date"
        return {"status": st, "figures": rec.result.figures, "acceptance": rec.result.acceptance,
                "size": sum(o["size"] for o in rec.outputs.values()),
                "duration_s": rec.duration_s, "peak_mb": rec.tool_peak_rss_mb or rec.peak_rss_mb,
                "log": rec.log, "standin": rec.is_standin, "from_cache": rec.from_cache is not None}
    if target in skipped:
        return {"status": "skipped", "reason": skipped[target]}
    return {"status": "skipped", "reason": "an upstream artifact failed"}


def _accuracy(figures, named: str | None = None) -> dict:
    """The artifact's own acceptance against its reference: worst cosine and relative error."""
    f = acceptance_figure(figures, named)
    return {"one_minus_cosine": max(0.0, 1.0 - f["cosine"]), "rel_max_abs": f.get("rel_max_abs")} if f and "cosine" in f else {}


def write_report(plan: Plan, started: str, skipped: dict[str, str], report_dir: str | None,
                 damaged: dict | None = None, release: dict | None = None) -> tuple[Path, int]:
    store = Store(plan)
    rows = []
    for node in plan.nodes.values():
        row = {"node": node.id, "stage": node.stage, "model": node.model, "labels": node.labels,
               "output": node.main_output, **_status(store, node, started, skipped)}
        row.update(_accuracy(row.get("figures"), row.get("acceptance")))
        rows.append(row)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    doc = {"started": started, "finished": utc_now(), "config": plan.config.path, "summary": counts,
           "coverage": coverage(rows), "skipped_targets": skipped, "verify_damaged": damaged or {}, "artifacts": rows,
           **({"release": release} if release else {})}
    out_dir = Path(report_dir or Path(plan.root) / REPORTS_DIR)
    stem = out_dir / f"nightly-{started[:19].replace(':', '')}"
    history = _append_history(out_dir, doc, stem)
    atomic_write(f"{stem}.json", json.dumps(doc, indent=1))
    atomic_write(f"{stem}.html", render_html(doc, history, Path(plan.root), out_dir))
    atomic_write(out_dir / "index.html", render_index(history))
    return stem, counts.get("failed", 0)


def coverage(rows: list[dict]) -> dict:
    """Cells of the matrix (model, graph, target, precision, batch size): declared, accepted (every
    node of the cell built or up to date, i.e. through its acceptance), and each hole with its node
    and reason (the failure's first line, with the layer or op a backend localized)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        lab = r["labels"]
        if "target" in lab and "precision" in lab:
            cells.setdefault((r["model"], lab.get("graph"), lab["target"], lab["precision"], str(lab.get("batch"))),
                             []).append(r)
    holes = []
    for key, members in sorted(cells.items()):
        bad = [m for m in members if m["status"] not in ("built", "up to date")]
        if bad:
            first = next((m for m in bad if m["status"] == "failed"), bad[0])
            holes.append({"cell": " ".join(key[:4]) + f" bs{key[4]}", "node": first["node"], "status": first["status"],
                          "reason": (first.get("reason") or "").splitlines()[0] if first.get("reason") else ""})
    accepted = len(cells) - len(holes)
    return {"cells": len(cells), "accepted": accepted,
            "share": round(accepted / len(cells), 4) if cells else None, "holes": holes}


def _append_history(out_dir: Path, doc: dict, stem: Path) -> list[dict]:
    """Add tonight to history.jsonl (rewritten whole and atomically: a crash never tears it) and
    return the nights, oldest first; a damaged line is skipped."""
    path = out_dir / "history.jsonl"
    nights = []
    try:
        for line in path.read_text().splitlines():
            try:
                night = json.loads(line)
            except ValueError:
                continue
            if isinstance(night, dict) and isinstance(night.get("artifacts"), dict):
                nights.append(night)
    except FileNotFoundError:
        pass
    keep = ("status", "duration_s", "size", "peak_mb", "one_minus_cosine", "rel_max_abs")
    nights.append({"started": doc["started"], "report": f"{stem.name}.html", "summary": doc["summary"],
                   **({"release": doc["release"]} if doc.get("release") else {}),
                   "artifacts": {r["node"]: {k: r[k] for k in keep if r.get(k) is not None} for r in doc["artifacts"]}})
    atomic_write(path, "".join(json.dumps(n) + "\n" for n in nights))
    return nights


# --- HTML ---------------------------------------------------------------------------------------
_e = html.escape
CSS = """body{font-family:system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin:6px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}
th{background:#f4f4f4}td.cell{text-align:center;min-width:64px}.legend span{padding:2px 8px;margin-right:6px;border:1px solid #ccc}
.fail{background:#fff0f0;border:1px solid #e99;padding:6px 10px;margin:4px 0}.reg{color:#b00;font-weight:bold}
.spark{vertical-align:middle}small{color:#666}"""


def _href(target: str, root: Path, out_dir: Path) -> str:
    path = Path(target) if Path(target).is_absolute() else root / target
    return _e(os.path.relpath(path, out_dir))


def _cell_label(row: dict) -> str:
    words = {"built": "built", "up to date": "ok", "failed": "FAILED", "skipped": "skipped"}[row["status"]]
    if row.get("standin"):
        words += " (stand-in)"
    if row.get("from_cache"):
        words += " (cache)"
    return words


def _matrix(model: str, rows: list[dict], root: Path, out_dir: Path) -> str:
    artifacts = [r for r in rows if r["model"] == model and "target" in r["labels"]
                 and r["stage"] not in COMPILE_STAGES_LAST]
    if not artifacts:
        return ""
    cols = sorted({(r["labels"]["target"], str(r["labels"].get("precision", ""))) for r in artifacts})
    def batch_key(b):
        return (0, b) if isinstance(b, int) else (1, 0)
    lines = sorted({(r["labels"]["graph"], json.dumps(r["labels"].get("batch"))) for r in artifacts},
                   key=lambda x: (x[0], batch_key(json.loads(x[1]))))
    cell = {(r["labels"]["graph"], json.dumps(r["labels"].get("batch")), r["labels"]["target"],
             str(r["labels"].get("precision", ""))): r for r in artifacts}
    out = [f"<h3>{_e(model)}</h3><table class=matrix><tr><th>graph</th><th>batch</th>"
           + "".join(f"<th>{_e(t)}<br><small>{_e(p)}</small></th>" for t, p in cols) + "</tr>"]
    for graph, batch in lines:
        b = json.loads(batch)
        out.append(f"<tr><td>{_e(graph)}</td><td>{_e(str(b) if isinstance(b, int) else 'dynamic ' + str(b))}</td>")
        for t, p in cols:
            r = cell.get((graph, batch, t, p))
            if r is None:
                out.append(f"<td class='cell' data-status='not declared' style='background:{STATUS_COLOURS['not declared']}'>"
                           "&ndash;</td>")
                continue
            tip = r.get("reason") or (f"{r.get('duration_s', '')} s" + (f", 1-cos {r['one_minus_cosine']:.2e}"
                                                                         if r.get("one_minus_cosine") is not None else ""))
            label = _e(_cell_label(r))
            if r.get("log"):
                label = f"<a href='{_href(r['log'], root, out_dir)}'>{label}</a>"
            out.append(f"<td class='cell' data-node='{_e(r['node'])}' data-status='{_e(r['status'])}' "
                       f"style='background:{STATUS_COLOURS[r['status']]}' title='{_e(tip[:300])}'>{label}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _spark(values: list, width: int = 120, height: int = 26) -> str:
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if not points:
        return "<svg class=spark width='%d' height='%d'></svg>" % (width, height)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    span, n = (hi - lo) or 1.0, max(len(values) - 1, 1)
    xy = [(2 + i * (width - 4) / n, height - 3 - (v - lo) / span * (height - 6)) for i, v in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    last = xy[-1]
    return (f"<svg class=spark width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
            f"<polyline fill='none' stroke='#36c' stroke-width='1.5' points='{path}'/>"
            f"<circle cx='{last[0]:.1f}' cy='{last[1]:.1f}' r='2.5' fill='#36c'/></svg>")


def regressions(series: list, higher_is_worse: bool, margin: float, floor: float) -> bool:
    """Tonight's value worse than the median of the earlier nights by the margin (and the floor)."""
    values = [v for v in series if v is not None]
    if len(values) < 3:
        return False
    *before, tonight = values
    median = statistics.median(before)
    worse = tonight - median if higher_is_worse else median - tonight
    return worse > max(abs(median) * margin, floor)


def _trends(history: list[dict], doc: dict) -> str:
    nights = history[-NIGHTS_SHOWN:]
    names = [r["node"] for r in doc["artifacts"] if "target" in r["labels"] and r["status"] != "skipped"]
    out = [f"<h2>Trends over the last {len(nights)} nights</h2><p><small>A figure is flagged when it is worse "
           "than the median of the earlier nights: build time by 50% (and 2 s), size by 10%, peak memory by 25% "
           "(and 50 MB), 1 - cosine doubled (and 1e-4).</small></p><table class=trends><tr><th>artifact</th>"
           + "".join(f"<th>{_e(title)}</th>" for title, *_ in TRENDS) + "</tr>"]
    flagged = 0
    for name in names:
        cells = []
        for _title, field, higher, margin, floor in TRENDS:
            series = [n["artifacts"].get(name, {}).get(field) for n in nights]
            bad = regressions(series, higher, margin, floor)
            flagged += bad
            last = next((v for v in reversed(series) if v is not None), None)
            shown = "" if last is None else (f"{last / 2**20:.1f} MiB" if field == "size" else f"{last:.3g}")
            cells.append(f"<td{' class=reg' if bad else ''}>{_spark(series)} {shown}{' &#9650; regression' if bad else ''}</td>")
        out.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return (f"<p class=summary-regressions>{flagged} regression(s) flagged</p>" if flagged else "") + "".join(out)


def render_html(doc: dict, history: list[dict], root: Path, out_dir: Path) -> str:
    rows = doc["artifacts"]
    failed = [r for r in rows if r["status"] == "failed"]
    parts = [f"<!doctype html><meta charset=utf-8><title>Nightly {_e(doc['started'])}</title><style>{CSS}</style>",
             f"<h1>Nightly build {_e(doc['started'])}</h1>",
             "<p><b>" + ", ".join(f"{_e(k)}: {v}" for k, v in sorted(doc["summary"].items())) + "</b>"
             f" &middot; config {_e(doc['config'])} &middot; finished {_e(doc['finished'])} &middot; "
             "<a href='index.html'>all nights</a></p>"]
    cov = doc.get("coverage") or {}
    if cov.get("cells"):
        parts.append(f"<p id=coverage><b>Coverage: {cov['accepted']} of {cov['cells']} cells built and accepted "
                     f"({cov['share']:.0%})</b></p>")
    if doc.get("release"):
        parts.append(f"<p id=release><b>Release:</b> {_release(doc['release'])}</p>")
    if failed:
        parts.append(f"<h2 id=failures>Failures ({len(failed)})</h2>")
        for r in failed:
            log = f" &middot; <a class=log href='{_href(r['log'], root, out_dir)}'>log</a>" if r.get("log") else ""
            parts.append(f"<div class=fail><b>{_e(r['node'])}</b>: {_e(r['reason'].splitlines()[0][:300])}{log}</div>")
    for target, why in doc["skipped_targets"].items():
        parts.append(f"<p>skipped target <b>{_e(target)}</b>: {_e(why.split(':')[0])} <small>({_e(why)})</small></p>")
    if doc.get("verify_damaged"):
        parts.append(f"<p>damaged outputs found and rebuilt: {_e(', '.join(doc['verify_damaged']))}</p>")
    parts.append("<h2>Matrix</h2><p class=legend>" + "".join(
        f"<span style='background:{c}'>{_e(s)}</span>" for s, c in STATUS_COLOURS.items()) + "</p>")
    for model in sorted({r["model"] for r in rows}):
        parts.append(_matrix(model, rows, root, out_dir))
    parts.append(_trends(history, doc))
    parts.append("<h2>Details</h2><table><tr><th>artifact</th><th>status</th><th>time (s)</th><th>size</th>"
                 "<th>peak memory</th><th>1 - cosine</th><th>rel. error</th></tr>")
    for r in rows:
        size = f"{r['size'] / 2**20:.2f} MiB" if r.get("size") else ""
        peak = f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") else ""
        cos = f"{r['one_minus_cosine']:.2e}" if r.get("one_minus_cosine") is not None else ""
        rel = f"{r['rel_max_abs']:.2e}" if r.get("rel_max_abs") is not None else ""
        parts.append(f"<tr><td>{_e(r['node'])}</td><td>{_e(_cell_label(r))}</td><td>{r.get('duration_s', '')}</td>"
                     f"<td>{size}</td><td>{peak}</td><td>{cos}</td><td>{rel}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _release(release: dict) -> str:
    """The night's release: a link to its manifest (a directory store) or its S3 name, and the
    command that fetches it; or why it was not published."""
    if release.get("error"):
        return f"<span class=reg>not published: {_e(release['error'])}</span>"
    name = f"{release['channel']}/{release['version']}"
    link = release["link"]
    shown = f"<a href='{_e(Path(link).as_uri())}'>{_e(name)}</a>" if link.startswith("/") else \
        f"{_e(name)} <small>({_e(link)})</small>"
    return f"{shown}, {release['files']} file(s) &middot; <code>doit fetch {_e(name)}</code>"


def render_index(history: list[dict]) -> str:
    items = "".join(f"<tr><td><a href='{_e(n['report'])}'>{_e(n['started'])}</a></td><td>"
                    + _e(", ".join(f"{k}: {v}" for k, v in sorted(n.get("summary", {}).items()))) + "</td><td>"
                    + (_release(n["release"]) if n.get("release") else "") + "</td></tr>"
                    for n in reversed(history))
    return (f"<!doctype html><meta charset=utf-8><title>Nightly builds</title><style>{CSS}</style>"
            f"<h1>Nightly builds</h1><table><tr><th>night</th><th>summary</th><th>release</th></tr>{items}</table>")

