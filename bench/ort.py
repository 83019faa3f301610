"""ONNX Runtime backend: `doit compile:cpu` of the default models.yaml from scratch, and per
ORT-format artifact its build time, the build process's peak RSS, its size against the ONNX
graph it came from, and its acceptance figures against the ONNX reference.

    .venv/bin/python bench/ort.py [--config models.yaml]

Builds in artifacts-bench/ort/ (git-ignored), export included (its time is reported apart).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DOIT = str(Path(sys.executable).parent / "doit")
sys.path.insert(0, str(REPO))

from buildplan import config  # noqa: E402
from buildplan.files import safe_name  # noqa: E402
from buildplan.plan import build_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "models.yaml"))
    args = ap.parse_args()
    work = REPO / "artifacts-bench" / "ort"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw["artifacts"] = str(work / "artifacts")
    for m in raw["models"]:  # the checkpoint paths stay where the config said
        ck = m["checkpoint"]
        if isinstance(ck, str) or "path" in ck:
            path = ck if isinstance(ck, str) else ck["path"]
            m["checkpoint"] = str((Path(args.config).parent / path).resolve())
    cfg = work / "models.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.perf_counter()
    proc = subprocess.run([DOIT, f"config={cfg}", "compile:cpu"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    plan = build_plan(config.load(cfg))
    state = Path(plan.root) / ".state"
    print(f"{'artifact':44} {'time':>6} {'peak RSS':>9} {'ORT':>9} {'ONNX':>9} {'cosine':>9} {'rel err':>8}")
    totals = {}
    for node in plan.nodes.values():
        path = state / f"{safe_name(node.id)}.json"
        if not path.exists():  # another target's artifact
            continue
        rec = json.loads(path.read_text())
        totals[node.stage] = totals.get(node.stage, 0.0) + rec["duration_s"]
        if node.stage != "ort":
            continue
        fig = rec["figures"]["ort_vs_onnx"]
        print(f"{node.id[4:]:44} {rec['duration_s']:5.2f}s {rec.get('peak_rss_mb', 0):7.0f}MB "
              f"{rec['ort_bytes'] / 1e6:7.2f}MB {rec['onnx_bytes'] / 1e6:7.2f}MB {fig['cosine']:9.6f} "
              f"{fig['rel_max_abs']:8.4f}")
    print("built here (time totals): " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items()) + f"; doit wall {wall:.1f} s")


if __name__ == "__main__":
    main()
