"""The shared artifact cache, on a directory and on a real S3 server (SeaweedFS on 127.0.0.1):
build once (clone A, write mode), pull everywhere (clone B, another folder, empty artifacts/),
and never trust or spread a bad result."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from buildplan import cache as cache_mod
from buildplan.files import sha256_file
from conftest import REPO, STANDIN_BIN, Relay, doit, executed, free_port, records, repo_copy, write_config

pytestmark = pytest.mark.tpu_mlir

def _models(cal=None, extra_cpu=()):
    return [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0},
             "graphs": ["BLIP_image", "BLIP_image_feat", "blip_itm"], "calibration": {"samples": 2},
             "targets": {"bm1684x": {"graphs": ["blip_itm"], "precisions": ["F32"]},
                         "cpu": [{"graphs": ["BLIP_image", "blip_itm"], "precisions": ["F32", "INT8"]},
                                 *extra_cpu],
                         "ascend310p3": {"graphs": ["BLIP_image"]}}}]


def _clone(tmp, name, url, mode, models=None):
    folder = tmp / name
    folder.mkdir()
    cfg = write_config(folder / "models.yaml", models or _models(), folder / "artifacts")
    raw = cfg.read_text() + f"cache: {{url: '{url}', mode: {mode}}}\n"
    cfg.write_text(raw)
    return cfg


def _outputs(root: Path) -> dict:
    """Output path -> sha256 of every real artifact (the stand-in's OMs name their own paths)."""
    return {rel: meta["sha256"] for name, rec in records(root).items() if not name.startswith("om__")
            for rel, meta in rec["outputs"].items()}


def _build_and_pull(tmp, url, env):
    a = _clone(tmp, "A", url, "write")
    first = doit(a, atc=True, env=env)
    b = _clone(tmp, "B", url, "read")
    second = doit(b, atc=True, env=env)
    return a, b, first, second


def _assert_pulled_everything(a, b, second):
    root_a, root_b = a.parent / "artifacts", b.parent / "artifacts"
    recs = records(root_b)
    real = {k: r for k, r in recs.items() if not k.startswith("om__")}  # the stand-in's OMs are never cached
    assert real and all("from_cache" in r for r in real.values()), [k for k, r in real.items() if "from_cache" not in r]
    assert all("from_cache" not in r for k, r in recs.items() if k.startswith("om__"))
    # no toolchain command ran for a pulled artifact: their logs hold the pull, no command line
    for rec in real.values():
        log = (root_b / rec["log"]).read_text()
        assert "pulled from the cache" in log and "\n$ (cd" not in log, log
    # byte-identical outputs
    outs_a, outs_b = _outputs(root_a), _outputs(root_b)
    assert outs_b == outs_a
    for rel, sha in outs_b.items():
        assert sha256_file(root_b / rel) == sha
    assert not list((root_b / ".staging").glob("*")) if (root_b / ".staging").exists() else True
    assert doit(b, "stale", "--check", atc=True, check=False).returncode == 0


def test_directory_cache_build_once_pull_everywhere(tmp_path):
    url = str(tmp_path / "shared-cache")
    a, b, first, second = _build_and_pull(tmp_path, url, None)
    _assert_pulled_everything(a, b, second)
    # the stand-in's OMs were built in A, and never uploaded
    entries = [json.loads(p.read_text()) for p in Path(url, "ac").glob("*.json")]
    assert entries and not any(e["node"].startswith("om:") for e in entries)
    assert all(e["provenance"]["host"] and e["provenance"]["user"] for e in entries)
    verify = doit(b, "cache", "verify", atc=True, check=False)
    assert verify.returncode == 0 and "0 corrupt" in verify.stdout


def test_s3_cache_build_once_pull_everywhere(tmp_path, s3):
    a, b, first, second = _build_and_pull(tmp_path, "s3://blipc/team-a", s3["env"])
    _assert_pulled_everything(a, b, second)
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="blipc", Prefix="team-a/")["Contents"]]
    assert any(k.startswith("team-a/ac/") for k in keys) and any(k.startswith("team-a/cas/") for k in keys)
    status = doit(b, "cache", "status", atc=True, env=s3["env"])
    assert "s3://blipc/team-a" in status.stdout


def test_keys_do_not_depend_on_where_or_who(tmp_path):
    """Two clones in different folders, configs, artifacts and calibration folders (same content)
    compute the same key for every artifact; a different parameter gives a different key."""
    keys = []
    for name in ("one", "two"):
        clone = repo_copy(tmp_path / f"clone-{name}")
        cal = tmp_path / f"cal-{name}"
        cal.mkdir()
        (cal / "s0.npz").write_bytes(b"same sample content")
        models = _models()
        models[0]["calibration"] = {"data": str(cal)}
        cfg = write_config(tmp_path / f"{name}.yaml", models, tmp_path / f"artifacts-{name}")
        script = ("import json, sys\nfrom buildplan import cache, config\nfrom buildplan.plan import build_plan\n"
                  "from buildplan.state import Store\nplan = build_plan(config.load(sys.argv[1]))\nstore = Store(plan)\n"
                  "print(json.dumps({n: cache.key(store.parts(node)) for n, node in plan.nodes.items()}))")
        env = {**os.environ, "PYTHONPATH": str(clone), "BLIPC_MEMO_DIR": str(tmp_path / f"local-cache-{name}"),
               "USER": name, "PATH": f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.run([sys.executable, "-c", script, str(cfg)], cwd=clone, env=env, capture_output=True,
                              text=True, check=True)
        keys.append(json.loads(proc.stdout))
    assert keys[0] == keys[1]
    assert len(set(keys[0].values())) == len(keys[0])  # every artifact its own key
    proc = subprocess.run([sys.executable, "-c", "from buildplan import backends; print(backends.toolchain('tpu_mlir').available)"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "True"  # the keys above include a real toolchain identity
    assert any(n.startswith("calibrate:") or "INT8" in n for n in keys[0])


class _DroppingProxy(Relay):
    """A relay to the S3 server that, once armed, cuts every connection after `limit` bytes of a
    response and then stops listening: the server gone in the middle of a download."""

    armed = False

    def __init__(self, port: int, limit: int):
        super().__init__(port)
        self.limit, self.cut = limit, threading.Event()

    def forward(self, chunk, upstream, passed):
        if not upstream and self.armed and passed + len(chunk) > self.limit:
            self.cut.set()
            self.sock.close()
            return chunk[: max(0, self.limit - passed)], True
        return chunk, False


def test_server_gone_mid_pull_leaves_no_partial_file_and_the_build_finishes(tmp_path, s3):
    a = _clone(tmp_path, "A", "s3://blipc/gone", "write")
    doit(a, atc=True, env=s3["env"])
    proxy = _DroppingProxy(s3["port"], limit=200_000)  # blip_itm's bmodel and ORT files are MBs
    proxy.armed = True
    b = _clone(tmp_path, "B", "s3://blipc/gone", "read")
    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    second = doit(b, atc=True, env=env)
    assert proxy.cut.is_set()
    assert "unavailable" in second.stderr and second.stderr.count("unavailable") == 1, second.stderr[-2000:]
    root_b = b.parent / "artifacts"
    recs = records(root_b)
    assert any("from_cache" not in r for k, r in recs.items() if not k.startswith("om__"))  # built after the cut
    pulled = {rel: sha for rec in recs.values() if "from_cache" in rec for rel, sha in
              ((r, m["sha256"]) for r, m in rec["outputs"].items())}
    assert pulled.items() <= _outputs(a.parent / "artifacts").items()
    assert doit(b, "stale", "--check", atc=True, env=env, check=False).returncode == 0  # complete all the same
    assert not (root_b / ".staging").exists() or not list((root_b / ".staging").iterdir())


def test_corrupt_object_is_detected_reported_and_rebuilt(tmp_path):
    url = tmp_path / "cache"
    a = _clone(tmp_path, "A", str(url), "write")
    doit(a, atc=True)
    rec = json.loads((a.parent / "artifacts/.state/bmodel__r.blip_itm.bm1684x.F32.1b.json").read_text())
    sha = next(iter(rec["outputs"].values()))["sha256"]
    blob = url / "cas" / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    blob.write_bytes(bytes(data))
    b = _clone(tmp_path, "B", str(url), "read")
    verify = doit(b, "cache", "verify", atc=True, check=False)
    assert verify.returncode == 1 and f"corrupt file cas/{sha}" in verify.stdout
    second = doit(b, atc=True)
    assert "corrupt in the cache" in second.stderr and "bmodel:r.blip_itm.bm1684x.F32.1b" in second.stderr
    pulled = json.loads((b.parent / "artifacts/.state/bmodel__r.blip_itm.bm1684x.F32.1b.json").read_text())
    assert "from_cache" not in pulled and "$ (cd" in (b.parent / "artifacts" / pulled["log"]).read_text()  # built
    assert doit(b, "cache", "--fix", "verify", atc=True, check=False).returncode == 1  # found and deleted
    assert doit(b, "cache", "verify", atc=True).returncode == 0


@pytest.mark.parametrize("where", ["directory", "s3"])
def test_racing_writers_leave_one_consistent_entry(tmp_path, request, where):
    env = request.getfixturevalue("s3")["env"] if where == "s3" else {}
    url = "s3://blipc/race" if where == "s3" else str(tmp_path / "cache")
    a = _clone(tmp_path, "A", url, "off")
    doit(a, "ort:r.blip_itm.cpu.F32.1b", env=env)
    rec = json.loads((a.parent / "artifacts/.state/ort__r.blip_itm.cpu.F32.1b.json").read_text())
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = cache_mod.CacheSettings(url, "write", False, "test")
        results = []

        def push():
            results.append(cache_mod.Cache(settings).push(rec, a.parent / "artifacts", log=lambda *_: None))
        threads = [threading.Thread(target=push) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r.startswith("uploaded") for r in results) == 1, results
        cache = cache_mod.Cache(cache_mod.CacheSettings(url, "read", False, "test"))
        entries = list(cache.store.entries())
        assert entries == [cache_mod.key(rec["parts"])]
        entry = json.loads(cache.store.get_entry(entries[0]))
        assert entry["digest"] == rec["digest"] and entry["node"] == rec["node"]
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_failed_gate_and_stand_in_upload_nothing(tmp_path):
    url = tmp_path / "cache"
    # BLIP_image_feat INT8 misses the INT8 acceptance (see models.yaml)
    models = _models(extra_cpu=({"graphs": ["BLIP_image_feat"], "precisions": ["INT8"]},))
    a = _clone(tmp_path, "A", str(url), "write", models)
    proc = doit(a, "--continue", atc=True, check=False)
    assert proc.returncode != 0 and "ort:r.BLIP_image_feat.cpu.INT8.1b" in proc.stdout + proc.stderr
    nodes = {json.loads(p.read_text())["node"] for p in (url / "ac").glob("*.json")}
    assert "ort:r.BLIP_image_feat.cpu.INT8.1b" not in nodes and not any(n.startswith("om:") for n in nodes)
    assert "ort:r.BLIP_image.cpu.INT8.1b" in nodes  # what passed is there
    push = doit(a, "cache", "push", atc=True)
    assert "built by a test stand-in" in push.stdout
    assert {json.loads(p.read_text())["node"] for p in (url / "ac").glob("*.json")} == nodes


def test_bad_urls_and_credentials_say_so_once(tmp_path, s3):
    for url, message in (("ftp://host/x", "unknown cache scheme 'ftp'"), ("s3://", "names no bucket")):
        cfg = _clone(tmp_path, f"bad{len(message)}", url, "read")
        proc = doit(cfg, "list", check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    cfg = _clone(tmp_path, "creds", "s3://blipc/creds", "read", [
        {"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny"}, "graphs": ["BLIP_image"],
         "targets": {"cpu": {}}}])
    wrong = {**s3["env"], "AWS_SECRET_ACCESS_KEY": "wrong"}
    proc = doit(cfg, env=wrong)  # builds locally
    assert proc.stderr.count("warning: cache s3://blipc/creds unavailable: credentials refused") == 1, proc.stderr
    assert executed(proc)
    shutil.rmtree(cfg.parent / "artifacts")
    required = doit(cfg, env={**wrong, "BLIPC_CACHE_REQUIRED": "1"}, check=False)
    assert required.returncode != 0 and "credentials refused" in required.stdout + required.stderr
    unreachable = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    shutil.rmtree(cfg.parent / "artifacts")
    proc = doit(cfg, env=unreachable)
    assert proc.stderr.count("warning: cache s3://blipc/creds unavailable") == 1, proc.stderr
