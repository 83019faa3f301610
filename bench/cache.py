"""Shared cache: the default matrix built from scratch (writing the cache) vs pulled from it into
an empty artifacts/, in one run: wall time, bytes moved, peak memory of the doit process.

    .venv/bin/python bench/cache.py [--s3]      # --s3: a SeaweedFS server on 127.0.0.1 instead of a directory
    .venv/bin/python bench/cache.py --s3 --big-file-mb 2048   # one GB-sized file up and down instead

--big-file-mb pushes one file of that size into the store (multipart on S3) and fetches it back
through the cache's verified download, each in a fresh process, and prints the time and the
process's peak RSS: it must stay flat, not grow with the file.

Every target this machine can build (ATC is absent here: its OMs are skipped). Works in
artifacts-bench/cache/ (git-ignored).
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: Path, env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """One `doit` in a child: wall seconds, its peak RSS in MiB (children's maximum, so one child
    per measurement: each run is measured by a fresh launcher process)."""
    launcher = ("import resource, subprocess, sys, time, json\n"
                "t = time.perf_counter()\n"
                "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                "wall = time.perf_counter() - t\n"
                "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
                "print(json.dumps({'wall': wall, 'peak': peak, 'rc': p.returncode, 'out': p.stdout[-3000:], "
                "'err': p.stderr[-3000:]}))")
    proc = subprocess.run([sys.executable, "-c", launcher, str(BIN / "doit"), f"config={cfg}"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        sys.exit(f"doit failed:\n{result['out']}\n{result['err']}")
    return result["wall"], result["peak"], result


# One transfer in a fresh interpreter: its peak RSS is the transfer's, not this script's.
TRANSFER = """
import hashlib, json, resource, sys, time
from pathlib import Path
from buildplan.cache import Cache, CacheSettings
what, url, path, sha, size = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cache = Cache(CacheSettings(url, "write", True, "bench"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
if what == "push":
    cache.store.put_blob(sha, path)
else:
    cache.fetch({"outputs": {"big": {"sha256": sha, "size": size, "path": path.name}}}, "big", path)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base": base}))
"""


def big_file(url: str, env: dict, work: Path, size_mb: int) -> None:
    import hashlib

    src, back = work / "big.bin", work / "big.back"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size_mb):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    sha, size = h.hexdigest(), src.stat().st_size
    for what, path in (("push", src), ("fetch", back)):
        proc = subprocess.run([sys.executable, "-c", TRANSFER, what, url, str(path), sha, str(size)], cwd=REPO,
                              env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout)
        print(f"{what:6} {size / 2**20:7.0f} MiB in {r['wall']:6.1f} s ({size / 2**20 / r['wall']:6.1f} MiB/s); "
              f"peak RSS {r['peak']:5.0f} MB (the interpreter with the cache loaded: {r['base']:.0f} MB)")
    same = back.stat().st_size == size and hashlib.file_digest(open(back, "rb"), "sha256").hexdigest() == sha
    print(f"fetched file identical: {same}")
    src.unlink()
    back.unlink()


def start_seaweed(work: Path, bucket: str) -> tuple[subprocess.Popen, dict]:
    """A SeaweedFS S3 server on 127.0.0.1 with one bucket: the process (stop it with
    os.killpg(p.pid, 15)) and the environment a boto3 client needs to reach it."""
    port = _free_port()
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
    (work / "seaweed").mkdir(exist_ok=True)
    server = subprocess.Popen([str(BIN / "weed"), "mini", f"-dir={work / 'seaweed'}", "-ip=127.0.0.1",
                               "-ip.bind=127.0.0.1", f"-s3.port={port}", "-master.telemetry=false", f"-bucket={bucket}",
                               *(f"-{n}.port={_free_port()}" for n in ("master", "volume", "filer", "admin"))],
                              env={**os.environ, **keys}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    env = {**keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for _ in range(120):
        try:
            client.head_bucket(Bucket=bucket)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    return server, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--s3", action="store_true", help="use a SeaweedFS S3 server on 127.0.0.1")
    ap.add_argument("--big-file-mb", type=int, default=0, help="one file of this size up and down instead")
    args = ap.parse_args()
    work = REPO / "artifacts-bench" / "cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "models.yaml").read_text())
    env, server = {}, None
    if args.s3:
        server, env = start_seaweed(work, "bench")
        url = "s3://bench/blipc"
    else:
        url = str(work / "cache")
    try:
        if args.big_file_mb:
            print(f"cache: {url}")
            return big_file(url, env, work, args.big_file_mb)
        results = {}
        for name, mode in (("build", "write"), ("pull", "read")):
            cfg = work / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({**raw, "artifacts": str(work / name), "cache": {"url": url, "mode": mode}},
                                          sort_keys=False))
            wall, peak, _ = run(cfg, env)
            state = work / name / ".state"
            recs = [json.loads(p.read_text()) for p in state.glob("*.json") if p.name not in ("hashcache.json", "verdicts.json")]
            pulled = [r for r in recs if "from_cache" in r]
            results[name] = {"wall": wall, "peak": peak, "artifacts": len(recs), "pulled": len(pulled),
                             "bytes": sum(r["from_cache"]["bytes"] for r in pulled),
                             "stored": sum(m["size"] for r in recs for m in r["outputs"].values())}
        b, p = results["build"], results["pull"]
        print(f"cache: {url}")
        print(f"{'':22} {'wall':>9} {'peak RSS':>9} {'artifacts':>10} {'moved':>10}")
        print(f"{'build from scratch':22} {b['wall']:8.1f}s {b['peak']:7.0f}MB {b['artifacts']:10d} "
              f"{b['stored'] / 2**20:8.1f}MB (uploaded)")
        print(f"{'pull into empty dir':22} {p['wall']:8.1f}s {p['peak']:7.0f}MB {p['pulled']:10d} "
              f"{p['bytes'] / 2**20:8.1f}MB (downloaded)")
        print(f"pull / build: {p['wall'] / b['wall'] * 100:.1f}% of the time")
    finally:
        if server:
            os.killpg(server.pid, 15)
            server.wait()


if __name__ == "__main__":
    main()
