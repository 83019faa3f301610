"""Backend ATC: Ascend offline models (stage `om`), one per graph x SoC x batch size.

The command line is computed at plan time (tests assert it exactly) with placeholders for
paths, so moving the checkout does not change any fingerprint. ATC appends `.om` to
--output. A `--dynamic_batch_size` target builds one OM for all its batch sizes from the
raw (batch-dynamic) graph.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from buildplan.core import FLAG_PATTERN, Node, Setting, StageError
from buildplan.toolchains import Toolchain, memoised, short_sha
from export.specs import GRAPHS

NAME = "atc"
LABEL = "ATC (Ascend CANN)"
# --soc_version values, keyed by our lower-case target name.
SOCS: dict[str, str] = {
    name.lower(): name
    for name in (
        "Ascend310", "Ascend310B1", "Ascend310B4", "Ascend310P1", "Ascend310P3",
        "Ascend910", "Ascend910A", "Ascend910B", "Ascend910B1", "Ascend910B2",
        "Ascend910B3", "Ascend910B4",
    )
}
TARGETS = tuple(SOCS)
PRECISION_MODES = ("force_fp16", "allow_fp32_to_fp16", "allow_mix_precision", "must_keep_origin_dtype", "force_fp32")
# Flags the stage sets itself; users may not override them through extra_flags.
MANAGED_FLAGS = ("--framework", "--model", "--output", "--input_format", "--input_shape", "--soc_version", "--log",
                 "--dynamic_batch_size", "--precision_mode", "--op_precision_mode")


def _check_flag(flag: str):
    """(problem, fix) for an extra flag ATC must not get as written, else None."""
    if not re.fullmatch(FLAG_PATTERN, flag):  # match() with `$` let a trailing newline through
        return f"{flag!r} is not of the form --flag=value", "write each ATC flag as one --flag=value string"
    if flag.split("=", 1)[0] in MANAGED_FLAGS:
        return (f"{flag.split('=', 1)[0]} is set by the build itself",
                "use the target's own fields (precision_mode, dynamic_batch, batch_sizes) instead")
    return None


SETTINGS = (
    Setting("precision_mode", "str", "ATC --precision_mode (default: ATC's own)", allowed=PRECISION_MODES),
    Setting("dynamic_batch", "bool", "one OM for all batch sizes (--dynamic_batch_size), from the raw graph",
            default=False),
    Setting("extra_flags", "flags", "graph -> more ATC flags, passed verbatim, each as --flag=value", default={},
            check=_check_flag),
)
ENVIRONMENT = ("ASCEND_TOOLKIT_HOME",)  # read by detect(); the no-op snapshot watches them
STAGE_DOCS = {"om": "Ascend OM"}
MEMORY_MB = {"om": {"tiny": 1000, "base": 8000}}  # a guess: ATC cannot run here to be measured
STANDIN_MARK = b"BLIPC-ATC-STANDIN"  # first bytes of what the test stand-in writes
HOWTO = ("install the Ascend CANN toolkit and `source <install>/ascend-toolkit/set_env.sh` "
         "(sets ASCEND_TOOLKIT_HOME and puts atc on PATH)")


# --- toolchain ---------------------------------------------------------------------------
def _version_files(atc: Path) -> list[Path]:
    """CANN writes version.info (Version=...) next to each component; look upwards from atc."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    candidates = [p / name for p in list(atc.resolve().parents)[:4] for name in ("version.info", "version.cfg")]
    if home:
        candidates += [Path(home) / "compiler" / "version.info", Path(home) / "version.cfg"]
    return candidates


def _version(atc: Path) -> str:
    for c in _version_files(atc):
        if c.is_file():
            m = re.search(r"^\s*(?:Version|version)\s*=\s*(\S+)", c.read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
    return "unknown"


def detect(settings: dict) -> tuple[Toolchain, list[str]]:
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    homes = (Path(home) / "bin" / "atc", Path(home) / "compiler" / "bin" / "atc") if home else ()
    # an atc copied into any PATH folder changes that folder's stat key
    watched = [str(p) for p in homes] + [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    found = next((c for c in homes if c.is_file() and os.access(c, os.X_OK)), None)
    if found is None and shutil.which("atc"):
        found = Path(shutil.which("atc"))
    if found is None:
        where = f"ASCEND_TOOLKIT_HOME={home} has no bin/atc" if home else "atc is not on PATH and ASCEND_TOOLKIT_HOME is unset"
        return Toolchain(NAME, False, problem=f"ATC (Ascend CANN toolkit) not found: {where}; {HOWTO}"), watched
    watched += [str(p) for p in (found, found.parent / "STANDIN", *_version_files(found))]
    return memoised(NAME, watched, lambda: identify(found)), watched


def identify(found: Path) -> Toolchain:
    standin = (found.parent / "STANDIN").exists()
    return Toolchain(NAME, True, {"version": _version(found), "build": short_sha(found, 1 << 20)},
                     str(found.parent), standin=standin)


# --- plan ----------------------------------------------------------------------------------
def om_stem(graph: str, batch: int | None) -> str:
    return f"{graph}_bs{batch}" if batch is not None else f"{graph}_dynbs"


def command(spec, dims: dict, soc: str, batch: int | None, target, batches: tuple[int, ...] = ()) -> list[str]:
    """ATC's argument list; {model}, {output} and {ini} are filled in at run time."""
    shapes = spec.shapes(dims, -1 if batch is None else batch)
    layout = "NCHW" if any(t.layout == "NCHW" for t in spec.inputs) else "ND"
    argv = ["atc", "--framework=5", "--model={model}", "--output={output}", f"--input_format={layout}",
            "--input_shape=" + ";".join(f"{n}:{','.join(map(str, s))}" for n, s in shapes.items()),
            "--log=error", f"--soc_version={SOCS[soc]}"]
    if spec.atc_op_precision:
        argv.append("--op_precision_mode={ini}")
    if batch is None:
        argv.append("--dynamic_batch_size=" + ",".join(map(str, batches)))
    if target.settings["precision_mode"]:
        argv.append(f"--precision_mode={target.settings['precision_mode']}")
    return argv


def declare(plan, model, dims: dict, target, exported) -> None:
    soc_dir, settings = SOCS[target.name], target.settings
    for graph in target.graphs:
        spec = GRAPHS[graph]
        # Dynamic mode compiles the raw graph (batch still symbolic); static mode the per-bs simplified one.
        for bs in (None,) if settings["dynamic_batch"] else target.batch_sizes:
            dep, role = exported.raw(graph) if bs is None else (exported.fixed(graph, bs), "onnx")
            stem = om_stem(graph, bs)
            plan.add(Node(
                id=f"om:{model.name}.{graph}.{target.name}.{'dyn' if bs is None else f'bs{bs}'}", stage="om",
                model=model.name, outputs={"om": f"{model.name}/{soc_dir}/{stem}.om"},
                action="compile.atc:run", toolchain=NAME, deps=(dep,),
                params={"graph": graph, "argv": command(spec, dims, target.name, bs, target, target.batch_sizes),
                        # the user's flags go to atc exactly as written, never through the placeholders
                        "extra_flags": list(settings["extra_flags"].get(graph, ())), "model_role": role,
                        "op_precision_ini": spec.atc_op_precision, "stem": stem},
                labels={"graph": graph, "batch": bs if bs is not None else list(target.batch_sizes),
                        "target": target.name, "precision": settings["precision_mode"] or "default"}),
                f"compile:{target.name}")


def _fill(arg: str, fill: dict) -> str:
    for placeholder, value in fill.items():
        arg = arg.replace(placeholder, value)
    return arg


def run(node: Node, ctx) -> dict:
    p = node.params
    work = ctx.workdir()
    model_file = ctx.input(p["model_role"])
    fill = {"{model}": str(model_file), "{output}": str(work / p["stem"]), "{ini}": str(work / "op_precision.ini")}
    if p["op_precision_ini"]:
        (work / "op_precision.ini").write_text(p["op_precision_ini"])
    tc = ctx.toolchain()
    argv = [str(tc.bin_dir) + "/atc"] + [_fill(a, fill) for a in p["argv"][1:]] + p["extra_flags"]
    ctx.run(argv, cwd=work, what="atc")
    produced = work / f"{p['stem']}.om"
    if not produced.is_file() or produced.stat().st_size == 0:
        raise StageError(f"atc exited 0 but wrote no {produced.name}")
    with open(produced, "rb") as f:
        standin = f.read(len(STANDIN_MARK)) == STANDIN_MARK
    shutil.move(produced, ctx.tmp("om"))
    return {"standin": standin, "atc_version": tc.label,
            "note": "written by the test stand-in, not a real compile" if standin else "real ATC output"}
