"""TPU-MLIR compile cost per artifact (wall time, peak RSS of the toolchain's largest process)
and the number of model_transform runs vs what the seed scripts run for the same matrix.

    .venv/bin/python bench/compile.py          # the default models.yaml's SOPHGO matrix (tiny demo)
    .venv/bin/python bench/compile.py --base   # plus blip_vqa_venc at BLIP-base size, bs1, F32, bm1684x
    .venv/bin/python bench/compile.py --base --skip-tiny [--no-simulate]

Everything is built from scratch in artifacts-bench/compile/ (the real stages through doit).
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
from buildplan.plan import build_plan  # noqa: E402

BASE_MODEL = {"name": "vqa_base", "task": "vqa", "checkpoint": {"synthetic": "base", "seed": 2},
              "graphs": ["blip_vqa_venc"], "targets": {"bm1684x": {"precisions": ["F32"]}}}


def build(work: Path, models: list[dict]) -> tuple[Path, list[str], float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = work / "models.yaml"
    cfg.write_text(yaml.safe_dump({"artifacts": str(work / "artifacts"), "models": models}, sort_keys=False))
    plan = build_plan(config.load(cfg))
    targets = [t for t, backend in plan.target_backend.items() if backend == "tpu_mlir"]
    t = time.perf_counter()
    proc = subprocess.run([DOIT, f"config={cfg}", *[f"compile:{c}" for c in targets]], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ran = [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]
    return cfg, ran, wall


def report(cfg: Path, ran: list[str], wall: float) -> None:
    plan = build_plan(config.load(cfg))
    state = Path(plan.root) / ".state"
    print(f"{'artifact':58} {'time':>7} {'peak RSS':>9}  cmodel")
    totals: dict[str, float] = {}
    for node in plan.nodes.values():
        if node.stage not in ("transform", "calibrate", "bmodel"):
            continue
        rec = json.loads((state / f"{node.id.replace(':', '__')}.json").read_text())
        totals[node.stage] = totals.get(node.stage, 0) + rec["duration_s"]
        sim = {"bmodel": "yes" if rec.get("simulated") else "no"}.get(node.stage, "")
        print(f"{node.id:58} {rec['duration_s']:6.1f}s {rec.get('tool_peak_rss_mb', 0):7.0f}MB  {sim}")
    print("stage totals: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items())
          + f"; whole doit run (export included) {wall:.1f} s")
    bmodels = [n for n in plan.nodes.values() if n.stage == "bmodel"]
    # The seed scripts run model_transform inside every per-chip script, for each graph and batch size.
    seed = len({(n.labels["target"], n.labels["graph"], n.labels["batch"]) for n in bmodels})
    ours = sum(1 for t in ran if t.startswith("transform:"))
    print(f"model_transform runs for {len(bmodels)} bmodels: {ours} here (executed), {seed} in the seed scripts "
          f"(one per chip x graph x batch size)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", action="store_true", help="also the BLIP-base image graph (bs1, F32, bm1684x)")
    ap.add_argument("--skip-tiny", action="store_true", help="only the --base part")
    ap.add_argument("--no-simulate", action="store_true",
                    help="base: compile only, no cmodel run (it takes tens of minutes at this size)")
    ap.add_argument("--workdir", default=str(REPO / "artifacts-bench" / "compile"))
    args = ap.parse_args()
    work = Path(args.workdir)
    default = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    sophgo = [{**m, "targets": {c: t for c, t in m["targets"].items() if c.startswith("bm")}} for m in default]
    if not args.skip_tiny:
        print("== tiny demo (models.yaml), every SOPHGO chip")
        report(*build(work / "tiny", [m for m in sophgo if m["targets"]]))
    if args.base:
        print("\n== BLIP-base blip_vqa_venc (480 px), bs1, F32, bm1684x")
        model = BASE_MODEL
        if args.no_simulate:
            model = {**BASE_MODEL, "targets": {"bm1684x": {"precisions": ["F32"], "simulate": False}}}
        report(*build(work / "base", [model]))


if __name__ == "__main__":
    main()
