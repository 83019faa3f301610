"""File primitives and well-known places, shared by config, toolchains, state and the no-op
snapshot (this module imports none of them)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("buildplan", "export", "compile")  # every module that can change a plan or an artifact
# Top-level folders of artifacts/ that are not a model's (each model builds under artifacts/<name>/).
LOGS_DIR, REPORTS_DIR, CHECKPOINTS_DIR = "logs", "reports", "checkpoints"
LAYOUT_DIRS = (LOGS_DIR, REPORTS_DIR, CHECKPOINTS_DIR)
MANIFEST = "manifest.json"  # what consumers read: every built, declared artifact


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """sha256 of a file, read in chunks (GB-sized artifacts), or of its first `limit` bytes."""
    h = hashlib.sha256()
    left = limit if limit is not None else -1
    with open(path, "rb") as f:
        while left:
            chunk = f.read(1 << 22 if left < 0 else min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk) if left > 0 else 0
    return h.hexdigest()


def utc_now() -> str:
    """A timestamp for records and reports: UTC, ISO 8601, seconds."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def safe_name(node_id: str) -> str:
    """A node id as a file name (records, logs, scratch folders)."""
    return node_id.replace(":", "__").replace("/", "_")


def default_config_path() -> Path:
    from buildplan import env

    return env.config_path(REPO)


def cache_dir() -> Path:
    """The memo folder (BLIPC_MEMO_DIR)."""
    from buildplan import env

    return env.memo_dir()


class SymlinkRefused(Exception):
    """A write under artifacts/ would go through a symlink the build did not create."""


def refuse_symlinks(root: str | Path, path: str | Path) -> None:
    """Raise SymlinkRefused if any existing component of `path` below `root`, `path` included, is
    a symlink: writes through one land outside artifacts/ (or overwrite its target). `root`
    itself may be a link: that is where the user chose to keep the artifacts."""
    root, path = Path(root), Path(path)
    rel = path.relative_to(root)
    current = root
    for part in rel.parts:
        current = current / part
        if os.path.islink(current):
            raise SymlinkRefused(
                f"refusing to write {path}: {current} is a symlink (to {os.readlink(current)}) that the build did "
                f"not create, and writes never follow symlinks under {root}. Remove it (to keep artifacts "
                f"elsewhere, point `artifacts:` in models.yaml there, or make {root} itself the link)")
        if not os.path.lexists(current):
            return  # nothing below a missing component exists yet


def read_json(path: str | Path, expect: type = dict):
    """A state or cache file's JSON, or None when it is missing, unreadable, not JSON or not of the
    expected top-level type: damaged state counts as no state and never stops a build."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):  # ValueError covers bad JSON and bytes that are not UTF-8
        return None
    return value if isinstance(value, expect) else None


# --- memos ------------------------------------------------------------------------------
# A memo only ever makes a check faster: it is signed (keyed BLAKE2b) with a key private to this machine's cache
# folder, so a memo edited, damaged or copied from elsewhere reads as absent and the answer is
# computed again. (Whoever can read the key can forge one; that is the user's own account.)
_MEMO_MAGIC = b"blipc-memo "
_memo_keys: dict[str, bytes] = {}


def _memo_key() -> bytes:
    folder = cache_dir()
    key = _memo_keys.get(str(folder))
    if key is None:
        path = folder / "memo.key"
        try:
            with open(path, "rb") as f:
                key = f.read()
        except FileNotFoundError:
            key = b""
        if len(key) != 32:
            folder.mkdir(parents=True, exist_ok=True)
            fresh = os.urandom(32)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".memo.key.")
            try:  # 0600 from mkstemp; link() refuses to replace a key another process made first
                os.write(fd, fresh)
                os.close(fd)
                if key:  # a damaged key: replace it (every memo signed with it is void anyway)
                    os.replace(tmp, path)
                else:
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            with open(path, "rb") as f:
                key = f.read()
        _memo_keys[str(folder)] = key
    return key


def _memo_mac(payload: bytes) -> bytes:
    # keyed BLAKE2 is a MAC by design (no hmac module to import on the no-op path)
    return hashlib.blake2b(payload, key=_memo_key(), digest_size=32).hexdigest().encode()


def write_memo(path: str | Path, value, durable: bool = False):
    """Write a memo: a signature line, then the JSON of `value`."""
    payload = json.dumps(value).encode()
    atomic_write(path, _MEMO_MAGIC + _memo_mac(payload) + b"\n" + payload, durable=durable)


def read_memo(path: str | Path, expect: type = dict):
    """A memo's value, or None when it is missing, damaged, unsigned, signed by another key or
    not of the expected type: then the caller computes the answer afresh."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        head, _, payload = data.partition(b"\n")
        # a plain comparison: the memo is a local file, nothing to learn from timing it
        if not head.startswith(_MEMO_MAGIC) or head[len(_MEMO_MAGIC):] != _memo_mac(payload):
            return None
        value = json.loads(payload)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, expect) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 hid records from a team


def atomic_write(path: str | Path, data: bytes | str, durable: bool = True):
    """Readers see the old or the new content, never a torn file. durable=False skips the fsync,
    for caches whose loss costs only a recomputation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stat_key(path: str | Path) -> tuple | None:
    """What changes whenever a file is written or replaced: a rename gives a new inode, and any
    write moves ctime, which (unlike mtime) a user cannot set back. None if it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # 'x.pth/config.json' does not exist either
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stat_keys(paths) -> list:
    """stat_key of each path, shaped as JSON gives it back (lists), for memos kept in JSON."""
    return [list(k) if k else None for k in map(stat_key, paths)]


def tree_paths(path: str) -> list[str]:
    """A path and, for a folder (a transformers checkpoint), every file below it, sorted."""
    found = [path]
    for folder, subdirs, files in os.walk(path):
        subdirs.sort()
        found += [os.path.join(folder, f) for f in sorted(files)]
    return found


def keep_newest(folder: Path, keep: int):
    """Delete all but the `keep` most recently written files of a cache folder (never the
    hidden temporary files of writes in flight)."""
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except FileNotFoundError:
        return
    entries.sort(key=lambda e: e.stat().st_mtime_ns, reverse=True)
    for entry in entries[keep:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
