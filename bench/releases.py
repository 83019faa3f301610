"""Releases: `doit publish` of the default matrix, then `doit fetch` of it into an empty folder and
once more (nothing to download), to a directory and to a SeaweedFS S3 server on 127.0.0.1: wall
time, files, MiB and peak RSS of each command.

    .venv/bin/doit && .venv/bin/python bench/releases.py

Publishes what the default models.yaml has built and accepted under artifacts/ (run `doit` first;
stale or missing artifacts are left out of a release, as always). Works in
artifacts-bench/releases/ (git-ignored).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cache import start_seaweed

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def measured(args: list[str], env: dict) -> dict:
    """One doit command in a fresh launcher: wall seconds and the command's peak RSS."""
    launcher = ("import json, resource, subprocess, sys, time\n"
                "t = time.perf_counter()\n"
                "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                "print(json.dumps({'wall': time.perf_counter() - t, 'rc': p.returncode, 'out': p.stdout + p.stderr,\n"
                "                  'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    proc = subprocess.run([sys.executable, "-c", launcher, str(BIN / "doit"), *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{result['out'][-3000:]}")
    return result


def main() -> None:
    work = REPO / "artifacts-bench" / "releases"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server, s3_env = start_seaweed(work, "bench")
    rows = []
    try:
        for kind, url, env in (("directory", str(work / "store"), {}), ("S3 (SeaweedFS)", "s3://bench/releases", s3_env)):
            publish = measured(["publish", "--to", url], env)
            dest = work / f"fetched-{kind.split()[0]}"
            fetch = measured(["fetch", "nightly", "--from", url, "--dest", str(dest)], env)
            again = measured(["fetch", "nightly", "--from", url, "--dest", str(dest)], env)
            doc = json.loads((dest / "release.json").read_text())
            size = sum(a["size"] for a in doc["artifacts"])
            left_out = len(doc["not_included"])
            rows.append((kind, len(doc["artifacts"]), size, left_out, publish, fetch, again))
    finally:
        os.killpg(server.pid, 15)
        server.wait()
    print(f"{'store':16} {'files':>5} {'MiB':>7} {'left out':>8}  {'publish':>16}  {'fetch':>16}  {'fetch again':>16}")
    for kind, files, size, left_out, publish, fetch, again in rows:
        cells = "  ".join(f"{r['wall']:6.1f} s {r['peak']:5.0f} MB" for r in (publish, fetch, again))
        print(f"{kind:16} {files:5d} {size / 2**20:7.1f} {left_out:8d}  {cells}")


if __name__ == "__main__":
    main()
