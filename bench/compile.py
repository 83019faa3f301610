"""TPU-MLIR compile cost per artifact (wall time, peak RSS of the toolchain's largest process)
and the number of model_transform runs vs what the seed scripts run for the same matrix.

    .venv/bin/python bench/compile.py          # the default models.yaml's SOPHGO matrix (tiny demo)
    .venv/bin/python bench/compile.py --base   # plus blip_vqa_venc at BLIP-base size, bs1, F32, bm1684x
    .venv/bin/python bench/compile.py --base --skip-tiny [--no-simulate]
    .venv/bin/python bench/compile.py --report models.blip-base.yaml   # figures of a build already made

--base builds models.blip-base.yaml's SOPHGO targets (retrieval blip_itm, captioning and VQA step
decoders and encoders, three chips) from its .pth checkpoints (`python -m export.synthetic` writes
synthetic ones), export and simplify included.

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


STAGES = ("onnx", "simplify", "transform", "calibrate", "bmodel")


def report(cfg: Path, ran: list[str], wall: float | None) -> None:
    """Per built artifact: wall time, the stage's own peak RSS (the doit process: export, gates,
    onnxsim), the toolchain's largest process, and for bmodels the device memory and file size."""
    plan = build_plan(config.load(cfg))
    state = Path(plan.root) / ".state"
    print(f"{'artifact':58} {'time':>7} {'own RSS':>8} {'tool RSS':>8} {'device':>8} {'bmodel':>8}  cmodel")
    totals: dict[str, float] = {}
    for node in plan.nodes.values():
        path = state / f"{node.id.replace(':', '__')}.json"
        if node.stage not in STAGES or not path.exists():
            continue
        rec = json.loads(path.read_text())
        totals[node.stage] = totals.get(node.stage, 0) + rec["duration_s"]
        sim = {"bmodel": "yes" if rec.get("simulated") else "no"}.get(node.stage, "")
        dev = rec.get("device_memory", {})
        mb = lambda v: f"{v / 2**20:6.0f}MB" if v else "        "  # noqa: E731
        print(f"{node.id:58} {rec['duration_s']:6.1f}s {rec.get('peak_rss_mb', 0):6.0f}MB "
              f"{rec.get('tool_peak_rss_mb', 0):6.0f}MB {mb(dev.get('device_bytes'))} {mb(dev.get('bmodel_bytes'))}  {sim}")
    print("stage totals: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items())
          + (f"; whole doit run (export included) {wall:.1f} s" if wall else ""))
    if not ran:
        return  # a report of an earlier build: what ran then is not known here
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
    ap.add_argument("--report", metavar="CONFIG", help="only print the figures of CONFIG's existing build")
    ap.add_argument("--workdir", default=str(REPO / "artifacts-bench" / "compile"))
    args = ap.parse_args()
    if args.report:
        report(Path(args.report).resolve(), [], None)
        return
    work = Path(args.workdir)
    default = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    sophgo = [{**m, "targets": {c: t for c, t in m["targets"].items() if c.startswith("bm")}} for m in default]
    if not args.skip_tiny:
        print("== tiny demo (models.yaml), every SOPHGO chip")
        report(*build(work / "tiny", [m for m in sophgo if m["targets"]]))
    if args.base:
        print("\n== BLIP-base: models.blip-base.yaml's SOPHGO targets (export and simplify included)")
        base = yaml.safe_load((REPO / "models.blip-base.yaml").read_text())["models"]
        for m in base:
            m["checkpoint"] = str(REPO / m["checkpoint"])
            m["targets"] = {c: t for c, t in m["targets"].items() if c.startswith("bm")}
            if args.no_simulate:
                blocks = lambda t: t if isinstance(t, list) else [t]  # noqa: E731
                m["targets"] = {c: [{**b, "simulate": False} for b in blocks(t)] for c, t in m["targets"].items()}
        report(*build(work / "base", base))


if __name__ == "__main__":
    main()
