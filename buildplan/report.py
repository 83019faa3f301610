"""Which artifacts are out of date, and why: the stale report (no torch import, fast)."""
from __future__ import annotations

from buildplan.plan import Plan
from buildplan.state import Store


def stale_nodes(plan: Plan) -> dict[str, list[dict]]:
    """node id -> reasons, for every declared node that is missing or stale (dependencies first)."""
    store = Store(plan)
    stale: dict[str, list[dict]] = {}
    for node_id in plan.closure(list(plan.nodes)):
        node = plan.nodes[node_id]
        reasons = store.check(node)
        failure = store.read_failure(node_id) if reasons else None
        if failure:  # what the last attempt found out (e.g. the layer a quantized model parts at)
            reasons.append({"kind": "failed", "text": "last build failed: " + (failure["error"].splitlines() or [""])[0]})
        upstream = [d for d in node.deps if d in stale]
        # A stale upstream explains a changed input; don't also list its digest change.
        reasons = [r for r in reasons if not (r["kind"] == "upstream" and any(u in r["text"] for u in upstream))]
        reasons += [{"kind": "upstream_stale", "text": f"upstream {d} is stale"} for d in upstream]
        if reasons:
            stale[node_id] = reasons
    return stale


def group_key(plan: Plan, node_id: str) -> str:
    n = plan.nodes[node_id]
    lab = n.labels
    parts = [n.model, lab.get("target", "export"), lab.get("precision", "-")]
    batch = lab.get("batch")
    parts.append(f"bs{batch}" if isinstance(batch, int) else ("bs" + ",".join(map(str, batch)) if batch else "-"))
    return " / ".join(parts)


def _order(plan: Plan, group: str) -> tuple:
    """Groups in reading order: batch sizes as numbers (bs4 before bs16), not as text."""
    *words, batch = group.split(" / ")
    numbers = [int(b) for b in batch[2:].split(",")] if batch.startswith("bs") else []
    return (*words, numbers)


def skipped_targets(plan: Plan, stale: dict[str, list[dict]]) -> dict[str, dict]:
    """Targets whose toolchain this machine lacks: target -> {reason, artifacts}. Their artifacts
    all share that one reason, so it is said once per target."""
    from buildplan import backends

    out: dict[str, dict] = {}
    for target, backend in plan.target_backend.items():
        tc = backends.toolchain(backend, plan.config)
        if not tc.available:
            out[target] = {"reason": tc.problem, "artifacts": [i for i in stale
                                                                if plan.nodes[i].labels.get("target") == target]}
    return out


def in_cache(plan: Plan, stale: dict[str, list[dict]]) -> dict[str, bool | None]:
    """Per stale node, whether the shared cache has it: True, False, or None when that cannot be
    known yet (an upstream artifact is neither built nor cached, so its content is unknown). An
    upstream artifact the cache has counts with the digest the cache says it has."""
    from buildplan import cache as cache_mod

    cache = cache_mod.for_config(plan.config)
    if not cache.usable():
        return {node_id: None for node_id in stale}
    store = Store(plan)
    digests: dict[str, str | None] = {}
    found: dict[str, bool | None] = {}
    for node_id in plan.closure(list(stale)):
        node = plan.nodes[node_id]
        if node_id not in stale:
            rec = store.read(node_id)
            digests[node_id] = rec["digest"] if rec else None
            continue
        if any(digests.get(d) is None for d in node.deps):
            found[node_id] = digests[node_id] = None
            continue
        parts = store.parts(node)
        parts["inputs"] = {d: digests[d] for d in node.deps}
        entry = cache.lookup(node, cache_mod.key(parts))
        found[node_id] = entry is not None
        digests[node_id] = entry["digest"] if entry else None
    return found


def as_json(plan: Plan, stale: dict[str, list[dict]], cached: dict | None = None) -> dict:
    skipped = skipped_targets(plan, stale)
    hidden = {i for s in skipped.values() for i in s["artifacts"]}
    items = []
    for node_id, reasons in stale.items():
        if node_id in hidden:
            continue
        n = plan.nodes[node_id]
        items.append({"node": node_id, "stage": n.stage, "model": n.model, "labels": n.labels,
                      "outputs": list(n.paths), "group": group_key(plan, node_id),
                      "reasons": [r["text"] for r in reasons], "reason_kinds": sorted({r["kind"] for r in reasons}),
                      **({"in_cache": cached.get(node_id)} if cached is not None else {})})
    return {"declared": len(plan.nodes), "stale": len(stale), "artifacts": items,
            "skipped_targets": {t: {"reason": s["reason"], "artifacts": len(s["artifacts"])} for t, s in skipped.items()}}


_CACHED_TEXT = {True: "in the cache: a pull, not a build", False: "not in the cache",
                None: "cache: unknown until its upstream is built"}


def as_text(plan: Plan, stale: dict[str, list[dict]], cached: dict | None = None) -> str:
    if not stale:
        return f"all {len(plan.nodes)} declared artifacts are up to date"
    skipped = skipped_targets(plan, stale)
    hidden = {i for s in skipped.values() for i in s["artifacts"]}
    by_group: dict[str, list[str]] = {}
    for node_id in stale:
        if node_id not in hidden:
            by_group.setdefault(group_key(plan, node_id), []).append(node_id)
    lines = [f"{len(stale)} of {len(plan.nodes)} declared artifacts are missing or out of date", ""]
    for target, s in sorted(skipped.items()):
        lines.append(f"{target}: {len(s['artifacts'])} artifacts not buildable on this machine: {s['reason']}")
    if skipped:
        lines.append("")
    for group in sorted(by_group, key=lambda g: _order(plan, g)):
        lines.append(group)
        for node_id in by_group[group]:
            lines.append(f"  {node_id}  ->  {plan.nodes[node_id].main_output}"
                         + (f"  [{_CACHED_TEXT[cached.get(node_id)]}]" if cached is not None else ""))
            lines += [f"      - {r['text']}" for r in stale[node_id]]
    return "\n".join(lines)
