"""Property tests (Hypothesis) over generated configs and generated damage to state files: no
traceback, exit 0 or 2 with a message naming the file, nothing written outside artifacts/, and a
rebuild after any damage yields exactly the declared, fresh set.

The default run uses a small fixed budget; for nightly use, a larger one:
    HYPOTHESIS_PROFILE=nightly .venv/bin/pytest tests/test_properties.py
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildplan import config
from conftest import doit, executed, records, write_config

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
# doit-level examples cost seconds each: their own, smaller budgets (scaled by the profile)
SCALE = 1 if os.environ.get("HYPOTHESIS_PROFILE", "default") == "default" else 10

BASE = {"models": [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3},
                    "graphs": ["BLIP_text"], "targets": {"ascend310p3": {"batch_sizes": [1]}}}]}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["F32", "INT8", "bm1684x", "BLIP_text", "logs", "..", "~",
                                                           "$HOME", "1_0", "1:0", "<<", "tiny", "", "/"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
# where in BASE a generated value goes: (path of keys, key to set)
SPOTS = [((), "models"), ((), "artifacts"), ((), "toolchains"), ((), "cache"), ((), "extra"),
         (("models", 0), "name"), (("models", 0), "task"), (("models", 0), "checkpoint"), (("models", 0), "graphs"),
         (("models", 0), "calibration"), (("models", 0), "image_size"), (("models", 0), "targets"),
         (("models", 0, "targets"), "ascend310p3"), (("models", 0, "targets"), "bm1684x"),
         (("models", 0, "targets", "ascend310p3"), "batch_sizes"), (("models", 0, "targets", "ascend310p3"), "extra_flags"),
         (("models", 0, "targets", "ascend310p3"), "dynamic_batch"), (("models", 0, "checkpoint"), "seed")]


@st.composite
def configs(draw) -> bytes:
    """A models.yaml: BASE with values replaced at random places, or YAML-ish text with random bytes."""
    if draw(st.integers(0, 4)) == 0:
        head = draw(st.sampled_from([b"models:\n- name: ", b"models: [", b"a: &a [1]\nmodels: *a\n", b"models:\n  - <<: ",
                                     b"%YAML 1.1\n---\nmodels:\n", b""]))
        return head + draw(st.binary(max_size=40))
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        path, key = draw(st.sampled_from(SPOTS))
        where = doc
        try:
            for step in path:
                where = where[step]
            where[key] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement removed that place
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()


@pytest.mark.unit
@given(text=configs())
def test_any_config_loads_or_is_one_config_error_naming_the_file(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "models.yaml"
    path.write_bytes(text)
    try:
        config.load(path)
    except config.ConfigError as e:
        assert "models.yaml" in str(e) and str(e).strip()
    assert sorted(p.name for p in folder.iterdir()) == ["models.yaml"]  # loading writes nothing beside it


@settings(max_examples=6 * SCALE)
@given(text=configs())
def test_doit_on_any_config_exits_0_or_2_without_traceback(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("doit")
    path = folder / "models.yaml"
    path.write_bytes(text)
    proc = doit(path, "list", check=False, timeout=120)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if proc.returncode == 2:
        assert "models.yaml" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["models.yaml"]


# --- damage to state files ----------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build (stand-in ATC), copied afresh for each example."""
    d = tmp_path_factory.mktemp("built")
    cfg = write_config(d / "models.yaml", BASE["models"], d / "artifacts")
    env = {"BLIPC_MEMO_DIR": str(d / "cache")}
    doit(cfg, atc=True, env=env)
    return d, set(records(d / "artifacts"))


def _state_files(root: Path, cache: Path) -> list[Path]:
    found = [p for p in root.rglob("*") if p.is_file() and (".state" in p.parts or p.name in ("manifest.json", ".doit.db"))]
    found += [p for p in cache.rglob("*.json")]  # memos: parsed YAML, no-op snapshot, toolchains, code deps
    return sorted(found)


@st.composite
def damages(draw):
    kind = draw(st.sampled_from(["delete", "truncate", "flip", "garbage", "json"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.binary(max_size=64)), draw(values)


def _damage(path: Path, kind: str, where: int, garbage: bytes, value) -> None:
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[: where % (len(data) + 1)])
    elif kind == "flip" and data:
        i = where % len(data)
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 + where % 255)]) + data[i + 1:])
    elif kind == "garbage":
        path.write_bytes(garbage)
    else:
        path.write_text(json.dumps(value))


@settings(max_examples=8 * SCALE)
@given(picks=st.lists(st.tuples(st.integers(0, 10**6), damages()), min_size=1, max_size=3))
def test_a_rebuild_after_any_damage_yields_exactly_the_declared_fresh_set(built, tmp_path_factory, picks):
    source, declared = built
    d = tmp_path_factory.mktemp("damaged")
    shutil.copytree(source / "artifacts", d / "artifacts", symlinks=True)
    shutil.copytree(source / "cache", d / "cache", symlinks=True)
    cfg = write_config(d / "models.yaml", BASE["models"], d / "artifacts")
    env = {"BLIPC_MEMO_DIR": str(d / "cache")}
    targets = _state_files(d / "artifacts", d / "cache")
    for pick, damage in picks:
        path = targets[pick % len(targets)]
        if path.exists():
            _damage(path, *damage)
    outside = sorted(p.name for p in d.iterdir())
    proc = doit(cfg, atc=True, env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in d.iterdir()) == outside  # nothing written beside artifacts/
    assert set(records(d / "artifacts")) == declared
    assert doit(cfg, "stale", "--check", atc=True, env=env).returncode == 0
    assert doit(cfg, "verify", atc=True, env=env).returncode == 0
    assert executed(doit(cfg, atc=True, env=env)) == []
