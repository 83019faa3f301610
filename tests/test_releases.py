"""Releases (`doit publish`, `doit fetch`, `doit releases`) on a directory and on a real S3 server
(SeaweedFS on 127.0.0.1): what is published, whole versions for readers, verified and resumable
downloads, retention."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildplan import releases
from buildplan.files import sha256_file
from conftest import REPO, Relay, _doit_env, doit, records, write_config

ORT_F32 = ("ort:r.BLIP_image.cpu.F32.1b", "ort:r.blip_itm.cpu.F32.1b")
FAILING = "ort:r.BLIP_image_feat.cpu.INT8.1b"  # misses the INT8 acceptance (models.yaml says so)
STANDIN = "om:r.BLIP_image.ascend310p3.bs1"


def _project(tmp: Path, name: str, seed: int) -> Path:
    folder = tmp / name
    folder.mkdir()
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": seed},
               "graphs": ["BLIP_image", "BLIP_image_feat", "blip_itm"], "calibration": {"samples": 2},
               "targets": {"cpu": [{"graphs": ["BLIP_image", "blip_itm"], "precisions": ["F32"]},
                                   {"graphs": ["BLIP_image_feat"], "precisions": ["INT8"]}],
                           "ascend310p3": {"graphs": ["BLIP_image"]}}}]
    return write_config(folder / "models.yaml", models, folder / "artifacts")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two projects, one checkpoint seed apart (so their files differ), each built once: two ORT
    models accepted and one OM made by the ATC stand-in; in A, an ORT INT8 model fails its acceptance."""
    tmp = tmp_path_factory.mktemp("projects")
    out = {}
    for name, seed in (("A", 0), ("B", 1)):
        cfg = _project(tmp, name, seed)
        proc = doit(cfg, "--continue", atc=True, check=False)
        if name == "A":
            assert proc.returncode != 0 and FAILING in proc.stdout + proc.stderr
        out[name] = cfg
    return out


def _manifest(store: Path, channel="nightly", version=None) -> dict:
    version = version or json.loads((store / channel / "latest.json").read_text())["version"]
    return json.loads((store / channel / "versions" / version / "manifest.json").read_text())


def _fetched(dest: Path) -> tuple[str, dict]:
    """The fetched release's version, and each file's sha256 checked against its manifest."""
    doc = json.loads((dest / "release.json").read_text())
    for art in doc["artifacts"]:
        if art["path"] in doc["fetched"]:
            assert sha256_file(dest / art["path"]) == art["sha256"], art["path"]
    assert not list(dest.rglob("*.part"))
    return doc["version"], {a["path"]: a["sha256"] for a in doc["artifacts"]}


def test_directory_release_round_trip(built, tmp_path):
    store = tmp_path / "releases"
    a = built["A"]
    pub = doit(a, "publish", "--to", str(store), atc=True)
    said = pub.stdout + pub.stderr
    assert f"not published: {STANDIN}: made by a test stand-in" in said
    assert f"not published: {FAILING}: failed:" in said
    doc = _manifest(store)
    recs = {r["node"]: r for r in records(a.parent / "artifacts").values()}
    # exactly the accepted real artifacts, each with its record's identity and figures
    assert {x["node"] for x in doc["artifacts"]} == set(ORT_F32)
    for art in doc["artifacts"]:
        rec = recs[art["node"]]
        assert rec["outputs"][art["path"]]["sha256"] == art["sha256"] == sha256_file(store / "nightly" / "versions" /
                                                                                      doc["version"] / art["path"])
        assert art["fingerprint"] == rec["fingerprint"] and art["figures"] == rec["figures"] and art["size"] > 0
        assert art["target"] == "cpu" and art["toolchain"]["name"] == "onnxruntime" and art["validated"]
    assert {"onnxruntime", "python"} <= set(doc["toolchains"])
    assert {m["node"] for m in doc["not_included"]} == {FAILING, STANDIN}

    # fetch latest, then one target; a second fetch downloads nothing
    dest = tmp_path / "got"
    fetch = doit(a, "fetch", "nightly", "--from", str(store), "--dest", str(dest))
    version, files = _fetched(dest)
    assert version == doc["version"] and set(files) == {x["path"] for x in doc["artifacts"]}
    again = doit(a, "fetch", "nightly", "--from", str(store), "--dest", str(dest))
    assert "0.0 MiB downloaded" in again.stdout and "already here" in again.stdout, fetch.stdout
    missing = doit(a, "fetch", "nightly", "--from", str(store), "--target", "ascend310p3", "--dest", str(tmp_path / "x"),
                   check=False)
    assert missing.returncode == 1 and "has no file for target 'ascend310p3'" in missing.stderr
    assert f"{STANDIN}: made by a test stand-in" in missing.stderr
    for ref, message in (("nightly/20200101T000000Z-abcd", "no version 20200101T000000Z-abcd in channel nightly"),
                         ("weekly", "no channel 'weekly'"), ("../x", "is not a release name")):
        proc = doit(a, "fetch", ref, "--from", str(store), "--dest", str(tmp_path / "x"), check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "(channels: nightly)" in doit(a, "fetch", "weekly", "--from", str(store), check=False).stderr

    # an interrupted fetch resumes: half a file already there (good bytes, then bad ones)
    art = max(doc["artifacts"], key=lambda x: x["size"])
    published = (store / "nightly" / "versions" / doc["version"] / art["path"]).read_bytes()
    for head in (published[: len(published) // 2], b"\0" * (len(published) // 2)):
        dest = tmp_path / f"resume{len(head)}{head[:1].hex()}"
        part = dest / (art["path"] + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(head)
        proc = doit(a, "fetch", "nightly", "--from", str(store), "--dest", str(dest))
        assert f"{art['path']}: resuming after" in proc.stdout
        assert _fetched(dest)[0] == doc["version"]

    # a flipped byte in the store: refused, and nothing of it kept
    stored = store / "nightly" / "versions" / doc["version"] / art["path"]
    flipped = bytearray(published)
    flipped[len(flipped) // 3] ^= 0x10
    stored.write_bytes(bytes(flipped))
    dest = tmp_path / "flipped"
    proc = doit(a, "fetch", "nightly", "--from", str(store), "--dest", str(dest), check=False)
    assert proc.returncode == 1 and f"{art['path']}: the copy in" in proc.stderr and "not the published file" in proc.stderr
    assert not (dest / art["path"]).exists() and not list(dest.rglob("*.part")) and not (dest / "release.json").exists()
    stored.write_bytes(published)

    # retention: two more versions, keep the newest
    for _ in range(2):
        doit(built["B"], "publish", "--to", str(store), atc=True)
    listed = doit(a, "releases", "--from", str(store)).stdout
    rows = [line.split() for line in listed.splitlines() if line.startswith("  ")]
    assert [r[-1] for r in rows] == ["complete", "complete", "latest"], listed
    dry = doit(a, "releases", "prune", "--keep", "1", "--from", str(store), "--dry-run")
    assert dry.stdout.count("would delete nightly/") == 2 and len(releases.versions(releases.open_store(str(store)),
                                                                                       "nightly")) == 3
    doit(a, "releases", "prune", "--keep", "1", "--from", str(store))
    left = releases.versions(releases.open_store(str(store)), "nightly")
    assert [v["version"] for v in left] == [_manifest(store)["version"]] and left[0]["complete"]
    assert sorted(p.name for p in (store / "nightly" / "versions").iterdir()) == [left[0]["version"]]  # no empty folders
    dest = tmp_path / "after-prune"
    doit(a, "fetch", "nightly", "--from", str(store), "--dest", str(dest))
    assert _fetched(dest)[0] == left[0]["version"]


class _HoldingProxy(Relay):
    """A relay to the S3 server that lets the first `passed` PUT requests through and holds the
    next one until released: a publish stopped halfway through its uploads."""

    def __init__(self, port: int, passed: int = 1):
        super().__init__(port)
        self.passed, self.puts = passed, 0
        self.holding, self.released, self.lock = threading.Event(), threading.Event(), threading.Lock()

    def forward(self, chunk, upstream, passed):
        if upstream and chunk.startswith(b"PUT "):
            with self.lock:
                self.puts += 1
                hold = self.puts > self.passed
            if hold:
                self.holding.set()
                self.released.wait()
        return chunk, False

    def close(self):
        self.released.set()
        self.sock.close()


def _publish_through(proxy, cfg: Path, url: str, s3: dict) -> subprocess.Popen:
    env = _doit_env(False, {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    return subprocess.Popen([str(Path(sys.executable).parent / "doit"), "publish", "--to", url, f"config={cfg}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_s3_readers_see_a_whole_release_during_a_publish_and_never_a_killed_one(built, s3, tmp_path, monkeypatch):
    url, env, a, b = "s3://blipc/releases", s3["env"], built["A"], built["B"]
    doit(a, "publish", "--to", url, env=env)
    first, first_files = _fetched_via(a, url, env, tmp_path / "first")

    # B's publish held after its first file: a reader gets A's release, whole
    proxy = _HoldingProxy(s3["port"])
    publishing = _publish_through(proxy, b, url, s3)
    try:
        assert proxy.holding.wait(120), publishing.communicate()[0] if publishing.poll() is not None else "no PUT"
        during, during_files = _fetched_via(a, url, env, tmp_path / "during")
        assert (during, during_files) == (first, first_files)
        assert "unfinished upload" in doit(a, "releases", "--from", url, env=env).stdout
    finally:
        proxy.close()
    assert publishing.wait(120) == 0, publishing.stdout.read()
    second, second_files = _fetched_via(a, url, env, tmp_path / "second")
    assert second != first and set(first_files) <= set(second_files)
    assert all(second_files[k] != first_files[k] for k in first_files)  # another checkpoint: other bytes

    # a publish killed halfway: no version appears, latest stays whole
    proxy = _HoldingProxy(s3["port"])
    killed = _publish_through(proxy, a, url, s3)
    try:
        assert proxy.holding.wait(120)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        proxy.close()
    after, after_files = _fetched_via(a, url, env, tmp_path / "after")
    assert (after, after_files) == (second, second_files)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    found = releases.versions(releases.open_store(url), "nightly")
    assert [v["complete"] for v in found].count(True) == 2 and [v["complete"] for v in found].count(False) == 1
    # too young to be called abandoned: prune keeps it (it may still be uploading)
    assert "unfinished" not in doit(a, "releases", "prune", "--keep", "5", "--dry-run", "--from", url, env=env).stdout

    # a flipped byte in S3 is refused
    art = next(iter(second_files))
    key = f"releases/nightly/versions/{second}/{art}"
    body = bytearray(s3["client"].get_object(Bucket="blipc", Key=key)["Body"].read())
    body[7] ^= 0x01
    s3["client"].put_object(Bucket="blipc", Key=key, Body=bytes(body))
    proc = doit(a, "fetch", "nightly", "--from", url, "--dest", str(tmp_path / "flipped"), env=env, check=False)
    assert proc.returncode == 1 and f"{art}: the copy in" in proc.stderr


def _fetched_via(cfg: Path, url: str, env: dict, dest: Path):
    doit(cfg, "fetch", "nightly", "--from", url, "--dest", str(dest), env=env)
    return _fetched(dest)


# --- retention, as a pure function ------------------------------------------------------------
def _version(i: int) -> str:
    return f"2026{1 + i // 28 % 12:02d}{1 + i % 28:02d}T000000Z-{i:04x}"


@pytest.mark.unit
@given(st.lists(st.booleans(), min_size=0, max_size=30), st.integers(1, 10), st.integers(0, 40), st.booleans())
def test_retention_keeps_the_newest_complete_versions_and_the_latest(complete, keep, latest_at, fresh):
    found = [{"version": _version(i), "complete": c} for i, c in enumerate(complete)]
    done = [v["version"] for v in found if v["complete"]]
    latest = done[latest_at % len(done)] if done else None
    now = releases.version_time(_version(len(found))) + (60 if fresh else 10 * releases.INCOMPLETE_GRACE_S)
    doomed = {v["version"] for v in releases.retention(found, keep, latest, now)}
    kept_complete = [v for v in done if v not in doomed]
    assert set(done[-keep:]) <= set(kept_complete) and latest not in doomed
    assert len(kept_complete) <= keep + 1
    for v in found:
        if not v["complete"]:  # unfinished uploads: kept while one may still be running, then deleted
            assert (v["version"] in doomed) == (now - releases.version_time(v["version"]) > releases.INCOMPLETE_GRACE_S)


@pytest.mark.unit
def test_latest_moves_to_a_publish_of_the_same_second_but_never_back_in_time(tmp_path):
    """Two publishes in one second get the same time and random suffixes: the one that finishes
    later moves `latest` (CI once saw B's publish leave it on A's, whose suffix sorted higher)."""
    from buildplan.stores import DirStore

    store = DirStore(tmp_path)
    assert releases._move_pointer(store, "nightly", "20261205T055443Z-ffff", "a")
    assert releases._move_pointer(store, "nightly", "20261205T055443Z-0000", "b")
    assert releases.read_json(store, releases.pointer("nightly"))["version"] == "20261205T055443Z-0000"
    assert releases._move_pointer(store, "nightly", "20261205T055444Z-0000", "c")
    assert not releases._move_pointer(store, "nightly", "20261205T055443Z-ffff", "d")  # an older publish ending late
    assert releases.read_json(store, releases.pointer("nightly"))["version"] == "20261205T055444Z-0000"


@pytest.mark.unit
def test_release_settings_are_checked_before_any_work(tmp_path):
    from buildplan.config import validate
    from buildplan.core import ConfigError

    model = {"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny"}, "targets": {"cpu": {}}}
    for block, field, fix in (({"channel": "Night Ly"}, "releases.channel", "lower-case"),
                              ({"keep": 0}, "releases.keep", "keep: 14"),
                              ({"url": "ftp://x/y"}, "releases.url", "s3://"),
                              ({"colour": 1}, "releases", "")):
        with pytest.raises(ConfigError) as e:
            validate({"models": [model], "releases": block}, "models.yaml", tmp_path)
        assert e.value.field.startswith(field) and fix in e.value.render(), e.value.render()
    ok = validate({"models": [model], "releases": {"url": "rel", "channel": "edge-team", "keep": 3}}, "models.yaml", tmp_path)
    assert ok.releases == {"url": str(tmp_path / "rel"), "channel": "edge-team", "keep": 3}


def test_nightly_publishes_and_its_dashboard_links_the_release(built, tmp_path):
    store = tmp_path / "releases"
    cfg = built["A"]
    raw = cfg.read_text()
    cfg.write_text(raw + f"releases: {{url: '{store}', channel: edge, keep: 2}}\n")
    try:
        reports = tmp_path / "reports"
        proc = doit(cfg, "nightly", "--publish", "--report-dir", str(reports), atc=True, check=False)
        assert proc.returncode == 1  # A's INT8 model fails every night
        report = json.loads(next(reports.glob("nightly-*.json")).read_text())
        release = report["release"]
        assert release["channel"] == "edge" and release["files"] == len(ORT_F32)
        assert _manifest(store, "edge")["version"] == release["version"]
        page = next(reports.glob("nightly-*.html")).read_text()
        manifest = store / "edge" / "versions" / release["version"] / "manifest.json"
        assert f"href='{manifest.as_uri()}'" in page and f"doit fetch edge/{release['version']}" in page
        assert f"edge/{release['version']}" in (reports / "index.html").read_text()
    finally:
        cfg.write_text(raw)
