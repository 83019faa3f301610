"""What a stage hands back (StageResult) and what the build keeps about an artifact (Record).

A record file is flat JSON (readers and older files keep working), but it is made and read
through these types: the runner's own fields are declared here once, and a stage cannot set one
of them (a stage returning `outputs` used to overwrite the record's list of outputs silently).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from buildplan.core import StageError


@dataclass(frozen=True)
class StageResult:
    figures: dict = field(default_factory=dict)  # comparison -> its figures (cosine, rel_max_abs, match...)
    acceptance: str | None = None  # which of `figures` decides acceptance; default: the first with a cosine
    standin: bool = False  # made by a test stand-in: never a real compile, never cached or published
    summary: str | None = None  # a few words for the console line, beside the acceptance figure
    extra: dict = field(default_factory=dict)  # anything else it reports (sizes, counts, device memory...)

    @classmethod
    def of(cls, value, stage: str = "stage") -> StageResult:
        """A stage's return value (None, a StageResult, or a dict of the fields above plus extras)."""
        if value is None:
            return cls()
        if isinstance(value, StageResult):
            result = value
        elif isinstance(value, dict):
            own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
            result = cls(**{k: v for k, v in value.items() if k in own},
                         extra={k: v for k, v in value.items() if k not in own})
        else:
            raise StageError(f"{stage}: returned {type(value).__name__}, not a StageResult or a dict")
        clash = sorted(set(result.extra) & RECORD_FIELDS)
        if clash:
            raise StageError(f"{stage}: its result sets {', '.join(clash)}, which the build records itself; "
                             "rename the key (or put it under `extra`)")
        if not isinstance(result.figures, dict) or not isinstance(result.standin, bool):
            raise StageError(f"{stage}: figures must be a mapping and standin true or false")
        return result

    def acceptance_figure(self) -> dict | None:
        return acceptance_figure(self.figures, self.acceptance)


def acceptance_figure(figures, named: str | None = None) -> dict | None:
    """The figure that decides an artifact's acceptance: the one its stage named, else the first
    with a cosine (each stage records its own comparison with its reference first)."""
    if not isinstance(figures, dict):
        return None
    if named is not None:
        found = figures.get(named)
        return found if isinstance(found, dict) else None
    return next((f for f in figures.values() if isinstance(f, dict) and "cosine" in f), None)


@dataclass(frozen=True)
class Record:
    """One committed artifact. Every field but `result` is the build's own."""
    node: str
    stage: str
    model: str
    fingerprint: str  # of `parts`
    parts: dict  # what it is made from: params, code, toolchain, sources, upstream digests
    outputs: dict  # path -> {size, mtime_ns, sha256}
    digest: str  # of the outputs' content: what downstream fingerprints take
    labels: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)  # role -> path
    toolchain: dict | None = None  # {name, label, standin}
    started_unix: float | None = None
    duration_s: float | None = None
    finished_at: str | None = None
    host: str | None = None
    log: str | None = None
    peak_rss_mb: float | None = None  # the build process while this task ran (export, gates, onnxsim)
    tool_peak_rss_mb: float | None = None  # the largest toolchain process
    worker: str | None = None  # where a Dask build ran it
    memory_request_mb: float | None = None
    from_cache: dict | None = None  # pulled instead of built: which cache, key, bytes, the original build's figures
    result: StageResult = field(default_factory=StageResult)

    def to_json(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "result"}
        flat = {k: v for k, v in own.items() if v is not None or k == "toolchain"}
        r = self.result
        flat.update(r.extra)
        flat["figures"] = r.figures
        if r.acceptance is not None:
            flat["acceptance"] = r.acceptance
        if r.standin:
            flat["standin"] = True
        if r.summary is not None:
            flat["summary"] = r.summary
        return flat

    @classmethod
    def from_json(cls, data, node_id: str | None = None) -> Record | None:
        """The record in a file's JSON, or None when it does not have a record's shape (damaged,
        foreign, or another node's): such a file is never trusted as a record."""
        if not _valid(data, node_id if node_id is not None else (data.get("node") if isinstance(data, dict) else None)):
            return None
        own = {k: v for k, v in data.items() if k in RECORD_FIELDS}
        rest = {k: v for k, v in data.items() if k not in RECORD_FIELDS}
        try:
            return cls(**own, result=StageResult.of(rest, data["node"]))
        except (TypeError, StageError):
            return None

    @property
    def is_standin(self) -> bool:
        return self.result.standin or bool((self.toolchain or {}).get("standin"))


RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(Record)) - {"result"}


def _valid(rec, node_id) -> bool:
    if not (isinstance(rec, dict) and isinstance(node_id, str) and rec.get("node") == node_id
            and isinstance(rec.get("fingerprint"), str) and isinstance(rec.get("digest"), str)
            and isinstance(rec.get("parts"), dict) and isinstance(rec.get("outputs"), dict)
            and isinstance(rec.get("stage"), str) and isinstance(rec.get("model"), str)):
        return False
    return all(isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("mtime_ns"), int)
               and isinstance(meta.get("sha256"), str) for meta in rec["outputs"].values())


def valid_record(rec, node_id) -> bool:
    """The shape every committed record has; anything else is not trusted as one."""
    return Record.from_json(rec, node_id) is not None
