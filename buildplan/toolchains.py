"""Find the toolchains that build artifacts and say exactly which build of each is in use.

An identity (version + build hash) is part of every artifact's fingerprint: a different
TPU-MLIR or CANN build makes its artifacts stale. Identities hash large files (TPU-MLIR's
RECORD, the atc binary), so each is memoised on disk while the files it came from keep their
stat keys: a no-op build only stats them.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from buildplan.files import atomic_write, cache_dir, read_json, stat_keys

TPU_MLIR_VERSION = "1.30.2"
TPU_MLIR_HOWTO = ("run ./bootstrap.sh (installs TPU-MLIR {v} into ~/.cache/blipc), or point BLIPC_TPU_MLIR "
                  "(or toolchains.tpu_mlir.root in models.yaml) at an environment whose bin/ has model_deploy.py"
                  ).format(v=TPU_MLIR_VERSION)
ATC_HOWTO = ("install the Ascend CANN toolkit and `source <install>/ascend-toolkit/set_env.sh` "
             "(sets ASCEND_TOOLKIT_HOME and puts atc on PATH)")
PYTHON_LIBS = ("torch", "transformers", "onnx", "onnxruntime", "onnxsim", "numpy")


class Toolchain(NamedTuple):
    name: str
    available: bool
    identity: dict = {}  # goes into fingerprints; empty when unavailable; never mutated
    bin_dir: str | None = None
    problem: str = ""  # why it is unavailable and how to get it
    standin: bool = False  # a test stand-in, never a real compiler

    @property
    def label(self) -> str:
        if not self.available:
            return "missing"
        build = self.identity.get("build")
        return self.identity.get("version", "?") + (f" (build {build})" if build else "")


def _sha(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit) if limit else f.read())
    return h.hexdigest()[:16]


def _installed_versions(names) -> dict:
    """Versions from the `<name>-<version>.dist-info` folder names on sys.path: one listdir per
    entry instead of importlib.metadata's full scan (20 ms per no-op run)."""
    wanted = {n.replace("-", "_").lower(): n for n in names}
    found = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if item.endswith(".dist-info") and "-" in item:
                dist, version = item[:-len(".dist-info")].rsplit("-", 1)
                name = wanted.get(dist.replace("-", "_").replace(".", "_").lower())
                if name and name not in found:  # the first sys.path entry wins, as for imports
                    found[name] = version
    return {n: found.get(n) for n in names}


# Per toolchain, the paths whose stat keys decide whether it is found and which build it is
# (the no-op snapshot watches them too).
WATCHED: dict[str, list[str]] = {}


def _memoised(name: str, watched: list[str], identify) -> Toolchain:
    """identify(), reused from the cache while every watched path keeps its stat key. Installing
    or removing a package renames a dist-info folder, which changes its parent's stat key."""
    key = f"{name}:{'|'.join(watched)}"
    stats = stat_keys(watched)
    memo_path = cache_dir() / "toolchains.json"
    memo = read_json(memo_path) or {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("stats") == stats:
        with contextlib.suppress(TypeError):  # a damaged entry: identify again
            return Toolchain(**hit["toolchain"])
    tc = identify()
    if tc.available:  # a missing toolchain is cheap to detect and its message depends on the env
        memo[key] = {"stats": stats, "toolchain": tc._asdict()}
        try:
            atomic_write(memo_path, json.dumps(memo), durable=False)
        except OSError:
            pass  # a read-only cache: identify again next time
    return tc


@functools.cache
def python_libs() -> Toolchain:
    WATCHED["python"] = [entry or "." for entry in sys.path]
    return _memoised("python", WATCHED["python"], _identify_python_libs)


def _identify_python_libs() -> Toolchain:
    versions = _installed_versions(PYTHON_LIBS)
    missing = [k for k, v in versions.items() if v is None]
    return Toolchain("python", not missing, {"version": versions["torch"] or "?", "libs": versions},
                     problem=f"missing Python packages {missing}: run ./bootstrap.sh" if missing else "")


def tpu_mlir_root(configured: str | None = None) -> Path:
    env = os.environ.get("BLIPC_TPU_MLIR") or configured
    if env:
        return Path(env)
    return cache_dir() / f"tpu-mlir-{TPU_MLIR_VERSION}"


@functools.cache
def tpu_mlir(configured: str | None = None) -> Toolchain:
    root = tpu_mlir_root(configured)
    bin_dir = root / "bin"
    WATCHED["tpu_mlir"] = [str(bin_dir / "model_deploy.py"), str(root / "lib")]
    if not (bin_dir / "model_deploy.py").is_file():
        return Toolchain("tpu_mlir", False, problem=f"TPU-MLIR not found at {root} (no bin/model_deploy.py): {TPU_MLIR_HOWTO}")
    site_dirs = sorted(glob.glob(str(root / "lib" / "python3*" / "site-packages")))
    WATCHED["tpu_mlir"] += site_dirs
    return _memoised("tpu_mlir", WATCHED["tpu_mlir"], lambda: _identify_tpu_mlir(bin_dir, site_dirs))


def _identify_tpu_mlir(bin_dir: Path, site_dirs: list[str]) -> Toolchain:
    dist = sorted(d for site in site_dirs for d in glob.glob(f"{site}/tpu_mlir-*.dist-info"))
    if dist:
        version = Path(dist[-1]).name[len("tpu_mlir-"):-len(".dist-info")]
        build = _sha(Path(dist[-1]) / "RECORD")  # RECORD lists every file's hash: a build identity
    else:  # a source build (e.g. SOPHGO's docker image): identify by the tool's own code
        version, build = "source", _sha(bin_dir / "model_deploy.py")
    return Toolchain("tpu_mlir", True, {"version": version, "build": build}, str(bin_dir))


def _atc_version_files(atc: Path) -> list[Path]:
    """CANN writes version.info (Version=...) next to each component; look upwards from atc."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    candidates = [p / name for p in list(atc.resolve().parents)[:4] for name in ("version.info", "version.cfg")]
    if home:
        candidates += [Path(home) / "compiler" / "version.info", Path(home) / "version.cfg"]
    return candidates


def _atc_version(atc: Path) -> str:
    for c in _atc_version_files(atc):
        if c.is_file():
            m = re.search(r"^\s*(?:Version|version)\s*=\s*(\S+)", c.read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
    return "unknown"


@functools.cache
def atc() -> Toolchain:
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    homes = (Path(home) / "bin" / "atc", Path(home) / "compiler" / "bin" / "atc") if home else ()
    # an atc copied into any PATH folder changes that folder's stat key
    WATCHED["atc"] = [str(p) for p in homes] + [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    found = next((c for c in homes if c.is_file() and os.access(c, os.X_OK)), None)
    if found is None and shutil.which("atc"):
        found = Path(shutil.which("atc"))
    if found is None:
        where = f"ASCEND_TOOLKIT_HOME={home} has no bin/atc" if home else "atc is not on PATH and ASCEND_TOOLKIT_HOME is unset"
        return Toolchain("atc", False, problem=f"ATC (Ascend CANN toolkit) not found: {where}; {ATC_HOWTO}")
    WATCHED["atc"] += [str(p) for p in (found, found.parent / "STANDIN", *_atc_version_files(found))]
    return _memoised("atc", WATCHED["atc"], lambda: _identify_atc(found))


def _identify_atc(found: Path) -> Toolchain:
    standin = (found.parent / "STANDIN").exists()
    return Toolchain("atc", True, {"version": _atc_version(found), "build": _sha(found, 1 << 20)},
                     str(found.parent), standin=standin)


def get(name: str, config=None) -> Toolchain:
    if name == "python":
        return python_libs()
    if name == "tpu_mlir":
        return tpu_mlir(config.tpu_mlir_root if config else None)
    if name == "atc":
        return atc()
    raise KeyError(name)


def reset():
    for f in (python_libs, tpu_mlir, atc):
        f.cache_clear()
    WATCHED.clear()
