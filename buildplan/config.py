"""Load and validate models.yaml before any work starts.

Every user mistake becomes one ConfigError naming the file, the field path
(e.g. `models[1].targets.bm1684.precisions[0]`), what is wrong and what is allowed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from buildplan.backends import by_target, registry
from buildplan.core import ConfigError, Setting
from buildplan.files import LAYOUT_DIRS, cache_dir, default_config_path, keep_newest, read_memo, write_memo
from export.presets import ARCHS, TASKS
from export.specs import graphs_for_task

# The core's own limits, declared once: the validator below and the schema (buildplan/schema.py) use them.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN)
CHANNEL_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"  # a release channel (buildplan/releases.py)
DEFAULT_CHANNEL = "nightly"
BATCH_SIZES = (1, 1024)  # the allowed range
DEFAULT_BATCH_SIZES = (1,)
SAMPLES = (1, 10000)  # calibration samples: the allowed range
DEFAULT_SAMPLES = 8
# A model's `calibration` block: each field with what it holds (`samples` is a count, the others paths).
CALIBRATION_FIELDS = {
    "samples": "how many samples calibrate an INT8 table; with images and texts, a decoder gate runs on the first 10",
    "data": "a folder of .npz samples keyed by input name",
    "images": "a folder of images, preprocessed as BLIP does",
    "texts": "a file of captions or questions, one per line (VQA: `question<TAB>answer` also calibrates the "
             "answer decoder)",
    "tokenizer": "a folder with BERT's vocab.txt (default: the checkpoint folder)",
}
DEFAULT_ARTIFACTS = "artifacts"
# What a models.yaml may be: a few KB, a few hundred nodes. Far above any real one, far below
# what hurts (a 600-byte alias bomb expanded to 8 GB).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
# NamedTuples rather than dataclasses keep the no-op `doit` fast (see export/specs.py).
class Checkpoint(NamedTuple):
    kind: str  # "synthetic" | "pth" | "hf_dir"
    path: str | None = None  # absolute, for pth / hf_dir
    preset: str | None = None  # synthetic
    seed: int = 0


class Target(NamedTuple):
    name: str
    backend: str  # the name of the backend that builds for it
    graphs: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    settings: dict = {}  # the backend's SETTINGS, validated, defaults filled in; never mutated


class Model(NamedTuple):
    name: str
    task: str
    checkpoint: Checkpoint
    arch: str
    image_size: int | None
    graphs: tuple[str, ...]
    targets: tuple[Target, ...]
    calibration: dict


class Config(NamedTuple):
    path: str  # the yaml file, absolute
    artifacts: str  # absolute artifacts root
    models: tuple[Model, ...]
    toolchains: dict = {}  # backend name -> its `toolchains:` settings (e.g. a TPU-MLIR root); never mutated
    cache: dict = {}  # the shared artifact cache: {url, mode, required} as written (see buildplan/cache.py)
    releases: dict = {}  # where `doit publish` puts releases: {url, channel, keep} (see buildplan/releases.py)


class _Checker:
    def __init__(self, file: str):
        self.file = file

    def fail(self, path: str, problem: str, fix: str = ""):
        raise ConfigError(self.file, path, problem, fix)

    def mapping(self, value, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_kind(value)}", f"write it as `key: value` lines ({', '.join(allowed)})")
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key), "unknown key", f"allowed keys here: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, "is required but missing", f"add `{key}:`")
        return value

    def typed(self, value, path: str, kind: type, what: str):
        # bool is an int in Python; a YAML `true` is never a valid number here.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(path, f"expected {what}, got {_kind(value)} {value!r}")
        return value

    def choice(self, value, path: str, allowed, what: str = "value"):
        if value not in allowed:
            self.fail(path, f"unknown {what} {value!r}", f"allowed: {', '.join(map(str, allowed))}")
        return value

    def str_list(self, value, path: str, allowed, what: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            self.fail(path, f"expected a non-empty list of {what}s, got {_kind(value)}", f"allowed: {', '.join(allowed)}")
        seen = []
        for i, item in enumerate(value):
            self.choice(item, f"{path}[{i}]", allowed, what)
            if item in seen:
                self.fail(f"{path}[{i}]", f"duplicate {what} {item!r}", "list each once")
            seen.append(item)
        return tuple(seen)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def load(path: str | os.PathLike | None = None) -> Config:
    path = Path(path or default_config_path()).resolve()
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    if not path.is_file():
        raise ConfigError(shown, "", "config file not found", "create it (see models.yaml) or pass config=FILE / BLIPC_CONFIG")
    text = path.read_bytes()
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(shown, "", f"{len(text)} bytes is not a models.yaml (at most {MAX_YAML_BYTES})",
                          "point config= at the models.yaml you meant")
    raw, remember = _parse_yaml(text, shown)
    cfg = validate(raw, shown, path.parent)
    remember()  # only documents that validated are memoised
    return cfg


def _parse_yaml(text: bytes, shown: str):
    """(document, remember): the YAML document with refusals, memoised as signed JSON by content
    hash, since importing PyYAML alone costs ~25 ms. `remember()` writes the memo; the caller
    calls it once the document validated. The memo is signed (files.read_memo): an edited one
    reads as absent and the file is parsed again."""
    digest = hashlib.sha256(text).hexdigest()
    memo = cache_dir() / "parsed-yaml" / f"{digest}.json"
    cached = read_memo(memo)
    if cached and cached.get("source_sha256") == digest and cached.get("rules") == YAML_RULES and "document" in cached:
        return cached["document"], lambda: None
    raw = _safe_yaml(text, shown)

    def remember():
        try:
            as_json = json.dumps(raw)
            if json.loads(as_json) == raw:
                write_memo(memo, {"source_sha256": digest, "rules": YAML_RULES, "document": raw})
                keep_newest(memo.parent, 256)  # one file per config text ever loaded (tests make many)
        except (TypeError, ValueError, OSError):
            pass  # not JSON-shaped (non-string keys) or a read-only cache: parse each time
    return raw, remember


YAML_RULES = "yaml-1.2-core"  # how scalars are read; part of the memo, so a change of rules re-parses


@functools.cache
def _loader_class():
    """A safe loader that reads scalars by YAML 1.2's core schema: `1_0`, `1:0`, `yes` and
    `2024-01-01` are strings (YAML 1.1 read them as 10, 60, true and a date), `010` is ten."""
    import yaml
    from yaml.resolver import BaseResolver

    class Resolver12(BaseResolver):
        pass

    for tag, pattern, first in (
            ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
            ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
            ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                      r"|\.(?:nan|NaN|NAN))$", "-+0123456789."),
            ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
            ("merge", r"^(?:<<)$", "<")):
        Resolver12.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(pattern), list(first))

    class Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
                 yaml.constructor.SafeConstructor, Resolver12):
        def __init__(self, stream):
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            Resolver12.__init__(self)

    def int12(loader, node):
        text = loader.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)

    Loader.add_constructor("tag:yaml.org,2002:int", int12)
    return Loader


def _safe_yaml(text: bytes, shown: str):
    """The document, read safely by YAML 1.2 rules, refusing duplicate keys (a second `bm1684x:`
    silently replaced the first), documents whose aliases expand beyond MAX_YAML_NODES, and
    nesting beyond MAX_YAML_DEPTH. Merge keys (`<<: *shared`) work."""
    import yaml

    loader = None
    try:  # what yaml.load does, with the checks between composing and constructing
        loader = _loader_class()(text)  # the reader already refuses some bytes here
        root = loader.get_single_node()
        _check_composed(loader, root, shown)
        return None if root is None else loader.construct_document(root)
    except yaml.YAMLError as e:
        raise ConfigError(shown, _yaml_where(e, text), f"not valid YAML: {getattr(e, 'problem', None) or e}",
                          "fix the YAML syntax (and save the file as UTF-8 text)") from None
    except RecursionError:
        raise _too_deep(shown) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_where(e, text: bytes) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(e, "position", None)  # the reader's errors count characters (bytes, for bad UTF-8)
    if isinstance(position, int):
        return f"line {text[:position].count(10) + 1}"  # 10: a newline byte
    return ""


def _too_deep(shown: str) -> ConfigError:
    return ConfigError(shown, "", f"the document is nested more than {MAX_YAML_DEPTH} levels deep",
                       "a models.yaml needs about six levels")


def _check_composed(loader, root, shown: str) -> None:
    """Before anything is constructed: count the nodes the document would have with every alias
    expanded, without expanding it (a shared node is counted once per use, from a memo), refuse
    nesting that deep, and refuse a key written twice in one mapping (keys brought in by a merge
    `<<` may be overridden: that is what merging is for)."""
    import yaml

    sizes: dict[int, int] = {}

    def size(node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _too_deep(shown)
        if id(node) not in sizes:
            if isinstance(node, yaml.MappingNode):
                _refuse_duplicate_keys(loader, node, shown)
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            total = 1
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_YAML_NODES:
                    line = node.start_mark.line + 1
                    raise ConfigError(shown, f"line {line}", f"the document expands to more than {MAX_YAML_NODES} "
                                      "values through its aliases (&anchor / *alias)",
                                      "write the values out, without nested aliases")
            sizes[id(node)] = total
        return sizes[id(node)]

    if root is not None:
        size(root, 0)


def _refuse_duplicate_keys(loader, node, shown: str) -> None:
    import yaml

    seen: dict = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # collection keys: the constructor refuses them (unhashable)
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(shown, f"line {line}", f"duplicate key {key!r} (first on line {seen[key]})",
                              "keep one: a second key silently replaces the first")
        seen[key] = line


def _usable_path(c: "_Checker", value, field: str, base_dir: Path, what: str, folder: bool = False) -> Path:
    """`value` resolved against the config's folder, a leading `~` expanded to the home folder; a
    ConfigError if it is empty, names an environment variable (never expanded: the build would
    depend on the shell), the system cannot use it (NUL byte, symlink loop, over-long name) or,
    for a folder, if something else is there."""
    c.typed(value, field, str, what)
    if not value.strip():
        c.fail(field, "is an empty path", f"give {what}, or leave the field out for its default")
    if "$" in value:
        c.fail(field, f"{value!r} names an environment variable, which is not expanded",
               "write the path out (a leading ~ is expanded to your home folder)")
    try:
        p = (base_dir / os.path.expanduser(value)).resolve()
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
    except (OSError, RuntimeError, ValueError) as e:  # ValueError: NUL byte; RuntimeError: symlink loop
        c.fail(field, f"{value!r} is not a usable path ({getattr(e, 'strerror', None) or e})",
               f"give {what} that exists or can be created")
    if folder and st is not None and not os.path.isdir(p):
        c.fail(field, f"{p} exists and is not a directory", f"give {what}")
    return p


def validate(raw, file: str, base_dir: Path) -> Config:
    c = _Checker(file)
    top = c.mapping(raw, "", ("models", "artifacts", "toolchains", "cache", "releases"), ("models",))
    artifacts = _usable_path(c, top.get("artifacts", DEFAULT_ARTIFACTS), "artifacts", base_dir, "a directory path", folder=True)
    if artifacts == base_dir.resolve() or artifacts in base_dir.resolve().parents:
        c.fail("artifacts", f"{artifacts} holds models.yaml itself (`doit prune` and `doit clean` would work among "
               "your own files)", "give a folder of its own, e.g. `artifacts: artifacts`")
    toolchains = {}
    configurable = {name: b.TOOLCHAIN_SETTINGS for name, b in registry().items() if getattr(b, "TOOLCHAIN_SETTINGS", ())}
    for name, raw in c.mapping(top.get("toolchains", {}), "toolchains", tuple(configurable)).items():
        toolchains[name] = _settings(c, configurable[name], raw, f"toolchains.{name}", None, (), base_dir)
    models_raw = top["models"]
    if not isinstance(models_raw, list) or not models_raw:
        c.fail("models", f"expected a non-empty list of models, got {_kind(models_raw)}")
    models, names = [], {}
    for i, m in enumerate(models_raw):
        model = _model(c, m, f"models[{i}]", base_dir)
        if model.name in names:
            c.fail(f"models[{i}].name", f"duplicate model name {model.name!r} (also models[{names[model.name]}])",
                   "give every model a unique name")
        names[model.name] = i
        models.append(model)
    return Config(str(base_dir / Path(file).name) if not os.path.isabs(file) else file,
                  str(artifacts), tuple(models), toolchains, _cache(c, top.get("cache"), base_dir),
                  _releases(c, top.get("releases"), base_dir))


def _cache(c: _Checker, raw, base_dir: Path) -> dict:
    from buildplan.cache import MODES, check_url

    if raw is None:
        return {}
    block = c.mapping(raw, "cache", ("url", "mode", "required"))
    out = {}
    if block.get("url") is not None:
        url = c.typed(block["url"], "cache.url", str, "a string (s3://bucket/prefix or a directory)")
        check_url(url, "cache.url", c.file)
        # a directory is relative to models.yaml, like every other path in it
        out["url"] = url if url.startswith("s3://") else str(_usable_path(c, url, "cache.url", base_dir,
                                                                          "a directory path", folder=True))
    if block.get("mode") is not None:
        # YAML 1.1 reads a bare `off` as false: that is what the user wrote
        out["mode"] = "off" if block["mode"] is False else c.choice(block["mode"], "cache.mode", MODES, "cache mode")
    if block.get("required") is not None:
        out["required"] = c.typed(block["required"], "cache.required", bool, "true or false")
    return out


def _releases(c: _Checker, raw, base_dir: Path) -> dict:
    from buildplan.stores import check_url

    if raw is None:
        return {}
    block = c.mapping(raw, "releases", ("url", "channel", "keep"))
    out = {}
    if block.get("url") is not None:
        url = c.typed(block["url"], "releases.url", str, "a string (s3://bucket/prefix or a directory)")
        check_url(url, "releases.url", c.file, "release store")
        out["url"] = url if url.startswith("s3://") else str(_usable_path(c, url, "releases.url", base_dir,
                                                                          "a directory path", folder=True))
    if block.get("channel") is not None:
        channel = c.typed(block["channel"], "releases.channel", str, "a string")
        if not re.fullmatch(CHANNEL_PATTERN, channel):
            c.fail("releases.channel", f"{channel!r} is not a channel name", "use lower-case letters, digits, '_' or '-' "
                   "(at most 64), e.g. nightly")
        out["channel"] = channel
    if block.get("keep") is not None:
        keep = block["keep"]
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            c.fail("releases.keep", f"expected a whole number of versions >= 1, got {keep!r}",
                   "e.g. `keep: 14` keeps the last 14 versions of each channel")
        out["keep"] = keep
    return out


def _model(c: _Checker, raw, path: str, base_dir: Path) -> Model:
    m = c.mapping(raw, path, ("name", "task", "checkpoint", "arch", "image_size", "graphs", "targets", "calibration"),
                  ("name", "task", "checkpoint", "targets"))
    name = c.typed(m["name"], f"{path}.name", str, "a string")
    if not NAME_RE.fullmatch(name):  # match() with `$` let a trailing newline through
        c.fail(f"{path}.name", f"{name!r} is not a safe artifact name (it would name files under artifacts/)",
               "use letters, digits, '_' or '-' (at most 64, no '/', '.' or spaces)")
    if name in LAYOUT_DIRS:
        c.fail(f"{path}.name", f"{name!r} is a folder used by the build itself under artifacts/",
               f"choose another name (not one of {', '.join(LAYOUT_DIRS)})")
    task = c.choice(m["task"], f"{path}.task", TASKS, "task")
    ckpt, implied_arch = _checkpoint(c, m["checkpoint"], f"{path}.checkpoint", base_dir)
    arch = m.get("arch", implied_arch or "base")
    c.choice(arch, f"{path}.arch", tuple(ARCHS), "arch")
    if implied_arch and arch != implied_arch:
        c.fail(f"{path}.arch", f"{arch!r} contradicts the synthetic preset {implied_arch!r}", "drop `arch` or make them equal")
    image_size = m.get("image_size")
    if image_size is not None:
        c.typed(image_size, f"{path}.image_size", int, "an integer")
        patch = ARCHS[arch]["vision"]["patch"]
        if image_size <= 0 or image_size % patch:
            c.fail(f"{path}.image_size", f"{image_size} is not a positive multiple of the patch size {patch}")
    task_graphs = graphs_for_task(task)
    graphs = c.str_list(m.get("graphs", task_graphs), f"{path}.graphs", task_graphs, f"{task} graph")
    targets_raw = m["targets"]
    if not isinstance(targets_raw, dict) or not targets_raw:
        c.fail(f"{path}.targets", f"expected a mapping of target -> settings, got {_kind(targets_raw)}",
               f"e.g. `{next(iter(by_target()))}: {{batch_sizes: [1]}}`; targets: {', '.join(by_target())}")
    targets = []
    for chip, spec in targets_raw.items():
        # One settings block per chip, or a list of them when graphs need different settings
        # (e.g. the image encoder in four precisions, the decoders in F32).
        if isinstance(spec, list) and not spec:
            c.fail(f"{path}.targets.{chip}", "empty list of settings blocks", "give one block or drop the chip")
        blocks = [(f"{path}.targets.{chip}[{i}]", b) for i, b in enumerate(spec)] if isinstance(spec, list) \
            else [(f"{path}.targets.{chip}", spec)]
        declared: dict[tuple, str] = {}
        for where, block in blocks:
            target = _target(c, chip, block, where, graphs, base_dir)
            for artifact in _artifacts_of(target):
                if artifact in declared:
                    c.fail(where, f"{' '.join(map(str, artifact))} is already declared in {declared[artifact]}",
                           "declare each graph, batch size and precision once per chip")
                declared[artifact] = where
            targets.append(target)
    targets = tuple(targets)
    cal = c.mapping(m.get("calibration", {}), f"{path}.calibration", tuple(CALIBRATION_FIELDS))
    samples = c.typed(cal.get("samples", DEFAULT_SAMPLES), f"{path}.calibration.samples", int, "an integer")
    if not SAMPLES[0] <= samples <= SAMPLES[1]:
        c.fail(f"{path}.calibration.samples", f"{samples} is out of range", f"use {SAMPLES[0]}..{SAMPLES[1]}")
    data = None
    if cal.get("data") is not None:
        data_path = base_dir / c.typed(cal["data"], f"{path}.calibration.data", str, "a directory path")
        if not data_path.is_dir():
            c.fail(f"{path}.calibration.data", f"directory {data_path} does not exist",
                   "point it at a folder of .npz files, one per sample, keyed by the graph's input names")
        data = str(data_path.resolve())
    real = _real_calibration(c, cal, f"{path}.calibration", base_dir, ckpt, data, graphs, targets)
    return Model(name, task, ckpt, arch, image_size, graphs, targets, {"samples": samples, "data": data, **real})


def _real_calibration(c: _Checker, cal: dict, path: str, base_dir: Path, ckpt, data, graphs, targets) -> dict:
    """calibration.images / texts / tokenizer: the files, checked before any work starts."""
    from export.datasets import IMAGE_SUFFIXES, image_files, read_texts
    from export.specs import producers

    if cal.get("images") is None:
        for key in ("texts", "tokenizer"):
            if cal.get(key) is not None:
                c.fail(f"{path}.{key}", "is only used with calibration.images", "add `images: <folder>` or remove it")
        return {"images": None, "texts": None, "tokenizer": None}
    if data is not None:
        c.fail(f"{path}.images", "give either `data` (.npz samples) or `images` and `texts`, not both",
               "remove one of them")
    images = base_dir / c.typed(cal["images"], f"{path}.images", str, "a directory path")
    if not images.is_dir() or not image_files(str(images)):
        c.fail(f"{path}.images", f"{images} is not a folder with images ({', '.join(IMAGE_SUFFIXES)})",
               "point it at a folder of calibration images")
    if cal.get("texts") is None:
        c.fail(f"{path}.texts", "is missing", "give a text file with one caption or question per line "
               "(VQA: `question<TAB>answer` also calibrates the answer decoder)")
    texts = base_dir / c.typed(cal["texts"], f"{path}.texts", str, "a file path")
    if not texts.is_file() or not read_texts(str(texts)):
        c.fail(f"{path}.texts", f"{texts} is not a file with at least one line of text",
               "give a text file with one caption or question per line")
    if cal.get("tokenizer") is not None:
        tokenizer = base_dir / c.typed(cal["tokenizer"], f"{path}.tokenizer", str, "a directory path")
    else:
        tokenizer = Path(ckpt.path) if ckpt.path else None
    if tokenizer is None or not (tokenizer / "vocab.txt").is_file():
        c.fail(f"{path}.tokenizer", f"{tokenizer or 'the checkpoint'} has no vocab.txt to tokenize {texts.name} with",
               "set calibration.tokenizer to a folder with BERT's vocab.txt (a transformers checkpoint folder has one)")
    for target in targets:
        if "INT8" not in target.settings.get("precisions", ()):
            continue
        for graph in target.graphs:
            missing = [g for g in producers(graph) if g not in graphs]
            if missing:
                c.fail(f"{path}.images", f"{graph} is calibrated on what {', '.join(missing)} computes from the images, "
                       "which this model does not export", f"add {', '.join(missing)} to the model's graphs")
    return {"images": str(images.resolve()), "texts": str(texts.resolve()), "tokenizer": str(tokenizer.resolve())}




def _checkpoint(c: _Checker, raw, path: str, base_dir: Path) -> tuple[Checkpoint, str | None]:
    if isinstance(raw, str):
        raw = {"path": raw}
    spec = c.mapping(raw, path, ("path", "synthetic", "seed"))
    if ("path" in spec) == ("synthetic" in spec):
        c.fail(path, "give exactly one of `path` or `synthetic`",
               "e.g. `checkpoint: model_base_retrieval_coco.pth` or `checkpoint: {synthetic: tiny, seed: 0}`")
    if "synthetic" in spec:
        preset = c.choice(spec["synthetic"], f"{path}.synthetic", tuple(ARCHS), "synthetic preset")
        seed = c.typed(spec.get("seed", 0), f"{path}.seed", int, "an integer")
        return Checkpoint("synthetic", preset=preset, seed=seed), preset
    if "seed" in spec:
        c.fail(f"{path}.seed", "only synthetic checkpoints take a seed", "remove `seed`")
    p = _usable_path(c, spec["path"], f"{path}.path", base_dir, "a file path")
    if p.is_dir():
        if not (p / "config.json").is_file():
            c.fail(f"{path}.path", f"{p} is a directory without config.json",
                   "point at a transformers save_pretrained() folder or at a BLIP .pth file")
        return Checkpoint("hf_dir", path=str(p)), None
    if not p.is_file():
        c.fail(f"{path}.path", f"checkpoint file {p} does not exist",
               "download it (e.g. model_base_retrieval_coco.pth from the BLIP release) or fix the path")
    return Checkpoint("pth", path=str(p)), None


def _artifacts_of(t: Target) -> list[tuple]:
    """What a target block builds, as (graph, batch, value of each axis setting, e.g. a precision)."""
    axes = [t.settings[s.key] for s in by_target()[t.name].SETTINGS if s.axis]
    found = [(g, f"bs{bs}") for g in t.graphs for bs in t.batch_sizes]
    for values in axes:
        found = [(*a, v) for a in found for v in values]
    return found


def _target(c: _Checker, name: str, raw, path: str, model_graphs: tuple[str, ...], base_dir: Path) -> Target:
    backend = by_target().get(name)
    if backend is None:
        c.fail(path, f"unknown chip {name!r}",
               "allowed: " + "; ".join(f"{', '.join(b.TARGETS)} ({b.LABEL})" for b in registry().values()))
    raw = {} if raw is None else raw
    c.mapping(raw, path, ("graphs", "batch_sizes") + tuple(s.key for s in backend.SETTINGS))
    graphs = c.str_list(raw.get("graphs", list(model_graphs)), f"{path}.graphs", model_graphs, "graph of this model")
    bs_raw = raw.get("batch_sizes", list(DEFAULT_BATCH_SIZES))
    if not isinstance(bs_raw, list) or not bs_raw:
        c.fail(f"{path}.batch_sizes", f"expected a non-empty list of integers, got {_kind(bs_raw)}")
    batch_sizes = []
    for i, bs in enumerate(bs_raw):
        c.typed(bs, f"{path}.batch_sizes[{i}]", int, "an integer")
        if not BATCH_SIZES[0] <= bs <= BATCH_SIZES[1]:
            c.fail(f"{path}.batch_sizes[{i}]", f"batch size {bs} is out of range", f"use {BATCH_SIZES[0]}..{BATCH_SIZES[1]}")
        if bs in batch_sizes:
            c.fail(f"{path}.batch_sizes[{i}]", f"duplicate batch size {bs}", "list each once")
        batch_sizes.append(bs)
    settings = _settings(c, backend.SETTINGS, raw, path, name, graphs, base_dir)
    return Target(name, backend.NAME, graphs, tuple(batch_sizes), settings)


def _settings(c: _Checker, declared: tuple[Setting, ...], raw, path: str, target: str | None,
              graphs: tuple[str, ...], base_dir: Path) -> dict:
    """A backend's declared settings from a block of models.yaml: each checked by its kind, with
    its default where absent (`raw` was already checked for unknown keys, or is checked here)."""
    raw = c.mapping({} if raw is None else raw, path, tuple(s.key for s in declared) + (
        ("graphs", "batch_sizes") if target else ()))
    on = f" on {target}" if target else ""
    values = {}
    for s in declared:
        field = f"{path}.{s.key}"
        if s.key not in raw or raw[s.key] is None:
            default = s.default_for(target)
            values[s.key] = tuple(default) if isinstance(default, list) else default
            continue
        value, allowed = raw[s.key], s.allowed_for(target)
        if s.kind == "bool":
            values[s.key] = c.typed(value, field, bool, "true or false")
        elif s.kind == "int":
            c.typed(value, field, int, f"an integer{f' ({s.unit})' if s.unit else ''}")
            if not (s.minimum is None or value >= s.minimum) or not (s.maximum is None or value <= s.maximum):
                default = s.default_for(target)
                c.fail(field, f"{value}{f' {s.unit}' if s.unit else ''} is out of range",
                       f"{s.help}; {s.minimum}..{s.maximum}" + (f" (default{on}: {default})" if default is not None else ""))
            values[s.key] = value
        elif s.kind == "str":
            c.typed(value, field, str, "a string")
            values[s.key] = c.choice(value, field, allowed, s.key) if allowed else value
        elif s.kind == "path":
            values[s.key] = str(_usable_path(c, value, field, base_dir, "a directory path", folder=True))
        elif s.kind == "choices":
            if not isinstance(value, list) or not value:
                c.fail(field, f"expected a non-empty list, got {_kind(value)}", f"allowed{on}: {', '.join(allowed)}")
            for i, item in enumerate(value):
                if item not in allowed:
                    c.fail(f"{field}[{i}]", f"{item!r} is not supported{on}", f"allowed{on}: {', '.join(allowed)}")
            if len(set(value)) != len(value):
                c.fail(field, f"a value is listed twice in {value}", "list each once")
            values[s.key] = tuple(value)
        elif s.kind == "flags":
            flags_by_graph = c.mapping(value, field, graphs)
            for g, flags in flags_by_graph.items():
                if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
                    c.fail(f"{field}.{g}", f"expected a list of strings, got {_kind(flags)}", 'e.g. ["--flag=value"]')
                for i, flag in enumerate(flags):
                    refused = s.check(flag) if s.check else None
                    if refused:
                        c.fail(f"{field}.{g}[{i}]", *refused)
            values[s.key] = {g: tuple(v) for g, v in flags_by_graph.items()}
        else:
            raise ValueError(f"setting {s.key}: unknown kind {s.kind!r}")
    return values
