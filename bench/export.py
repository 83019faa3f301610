"""Export cost: one checkpoint load for all of a model's graphs (what the build does) vs one load
per graph (what the Ascend seed's export does), on the same checkpoint; for captioning and VQA
(--task), the export of all their graphs, with the stage's own peak RSS from each record.

Both variants run the real onnx stage through doit (export + ONNX Runtime gates), in one doit
process each; a variant's figures are its wall time and the peak RSS of that process.

    .venv/bin/python bench/export.py                 # base preset (BLIP-base sizes; minutes, GBs)
    .venv/bin/python bench/export.py --preset tiny   # quick check of the bench itself
    .venv/bin/python bench/export.py --task captioning   # or vqa: all the task's graphs, one load
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DOIT = str(Path(sys.executable).parent / "doit")
GRAPHS = ["BLIP_text", "BLIP_image", "BLIP_image_feat", "BLIP_itm"]
TASK_GRAPHS = {"captioning": ["blip_cap_venc", "blip_cap_step", "blip_cap"],
               "vqa": ["blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step", "blip_vqa_tdec"]}
TASK_SEEDS = {"retrieval": 0, "captioning": 1, "vqa": 2}


def run_measured(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process, from its own rusage."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024  # Linux reports KiB


def variant(work: Path, name: str, models: list[dict]) -> tuple[float, int]:
    root = work / name
    shutil.rmtree(root, ignore_errors=True)  # nothing cached: every graph is exported
    root.mkdir(parents=True)
    cfg = root / "models.yaml"
    cfg.write_text(yaml.safe_dump({"artifacts": str(root / "artifacts"), "models": models}, sort_keys=False))
    return run_measured([DOIT, f"config={cfg}", *[f"onnx:{m['name']}" for m in models]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base", choices=["tiny", "base"])
    ap.add_argument("--task", default="retrieval", choices=list(TASK_SEEDS))
    ap.add_argument("--workdir", default=str(REPO / "artifacts-bench" / "export"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    task, seed = args.task, TASK_SEEDS[args.task]
    ckpt = work / f"{task}_{args.preset}_seed{seed}.pth"
    if not ckpt.exists():
        sys.path.insert(0, str(REPO))
        from export.synthetic import save, synthetic_state_dict

        t = time.perf_counter()
        save(synthetic_state_dict(task, args.preset, seed), ckpt)
        print(f"wrote synthetic {args.preset} checkpoint {ckpt} in {time.perf_counter() - t:.0f} s")

    def model(name, graphs):
        target = {"ascend310p3": {"batch_sizes": [1]}} if task == "retrieval" else {"bm1684x": {"graphs": graphs[:1]}}
        return {"name": name, "task": task, "checkpoint": str(ckpt), "arch": args.preset, "graphs": graphs,
                "targets": target}

    if task != "retrieval":
        wall, peak = variant(work, task, [model(task, TASK_GRAPHS[task])])
        rec = json.loads((work / task / "artifacts" / ".state" / f"onnx__{task}.json").read_text())
        print(f"{task}, preset {args.preset}, checkpoint {ckpt.stat().st_size / 2**30:.2f} GB, "
              f"graphs {', '.join(TASK_GRAPHS[task])} (export + ONNX Runtime gates at bs 1 and 3, decoder loops vs generate())")
        print(f"doit process: {wall:7.1f} s, peak RSS {peak / 2**30:5.2f} GB; the export stage alone: "
              f"{rec['duration_s']:.1f} s, peak RSS {rec['peak_rss_mb'] / 1024:.2f} GB")
        return

    one = variant(work, "one_load", [model("r", GRAPHS)])
    per = variant(work, "load_per_graph", [model(f"r_{g.lower()}", [g]) for g in GRAPHS])
    gb = 1 << 30
    print(f"retrieval, preset {args.preset}, checkpoint {ckpt.stat().st_size / gb:.2f} GB, graphs {', '.join(GRAPHS)}")
    print("(export + ONNX Runtime gates at bs 1 and 3, one doit process per variant)")
    print(f"one load for all graphs:  {one[0]:7.1f} s   peak RSS {one[1] / gb:5.2f} GB")
    print(f"one load per graph:       {per[0]:7.1f} s   peak RSS {per[1] / gb:5.2f} GB")
    print(f"time saved by one load:   {per[0] - one[0]:7.1f} s ({(1 - one[0] / per[0]) * 100:.0f}%)")


if __name__ == "__main__":
    main()
