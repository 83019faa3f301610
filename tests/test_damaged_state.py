"""Damaged state never wedges a build (issue: one record of `{}` crashed every `doit`): every state
and cache file, made empty, garbage or JSON of the wrong shape, is taken as absent. A damaged
record is "record unreadable" and its node alone rebuilds; a damaged cache costs a recomputation."""
import json

import pytest

from conftest import doit, executed, write_config

MODEL = [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3}, "graphs": ["BLIP_text"],
          "targets": {"ascend310p3": {"batch_sizes": [1]}}}]
DAMAGES = {"empty": b"", "garbage": bytes(range(256)) * 3, "list": b"[]", "object": b"{}",
           "wrong types": json.dumps({"node": 5, "outputs": [1], "fingerprint": {}, "parts": "x", "digest": None,
                                      "stats": 7, "context": [], "artifacts": "x", "error": 3}).encode()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    cache = d / "cache"
    cfg = write_config(d / "models.yaml", MODEL, d / "artifacts")
    env = {"BLIPC_MEMO_DIR": str(cache)}
    doit(cfg, "export:m", env=env)
    return cfg, d / "artifacts", cache, env


def _state_files(root, cache):
    files = {
        "record": root / ".state" / "onnx__m.json",
        "verdict memo": root / ".state" / "verdicts.json",
        "hash cache": root / ".state" / "hashcache.json",
        "manifest": root / "manifest.json",
        "toolchain memo": cache / "toolchains.json",
        "failure marker": root / ".state" / "failed" / "onnx__m.json",
    }
    files.update({f"parsed-yaml {i}": p for i, p in enumerate(sorted((cache / "parsed-yaml").glob("*.json")))})
    files.update({f"no-op snapshot {i}": p for i, p in enumerate(sorted((cache / "noop").glob("*.json")))})
    return files


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damaged_state_file_is_taken_as_absent(built, damage):
    cfg, root, cache, env = built
    files = _state_files(root, cache)
    assert any(k.startswith("parsed-yaml") for k in files) and any(k.startswith("no-op") for k in files)
    for what, path in files.items():
        original = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(DAMAGES[damage])
        try:
            stale = doit(cfg, "stale", "--json", env=env, check=False)
            assert stale.returncode in (0, 1) and "Traceback" not in stale.stderr, (what, stale.stderr[-2000:])
            if what == "record":
                report = json.loads(stale.stdout)
                assert "record unreadable" in json.dumps(report), (what, report)
            build = doit(cfg, "export:m", env=env, check=False)
            assert build.returncode == 0 and "Traceback" not in build.stderr + build.stdout, (what, build.stdout[-2000:])
            assert executed(build) == (["onnx:m"] if what == "record" else []), (what, executed(build))
            assert executed(doit(cfg, "export:m", env=env)) == [], what  # and then it is fresh again
        finally:
            if original is None:
                path.unlink(missing_ok=True)
            elif what != "record":  # a rebuilt record is the new truth; the rest is restored
                path.write_bytes(original)
