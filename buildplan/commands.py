"""doit commands: `doit stale` and `doit nightly` (registered in pyproject.toml)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from doit.cmd_base import DoitCmdBase

from buildplan.distributed import DaskRun
from buildplan.files import MANIFEST


def _session(cmd):
    session = getattr(cmd.loader, "session", None)
    if session is None:
        raise SystemExit("error: run this from the project folder (its pyproject.toml names the blipc loader)")
    return session


def _print_to_a_pipe(text: str) -> None:
    """print(), quiet when the reader has gone (`doit stale --json | head`)."""
    import os

    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Stale(DoitCmdBase):
    name = "stale"
    builds = False
    doc_purpose = "list declared artifacts that are missing or out of date, with reasons"
    doc_usage = "[--json] [--check] [--remote]"
    doc_description = ("Exit status with --check: 1 when anything is stale, else 0. --remote adds, per stale "
                       "artifact, whether the shared cache has it (a pull instead of a build).")
    cmd_options = (
        {"name": "as_json", "long": "json", "type": bool, "default": False, "help": "machine-readable output"},
        {"name": "check", "long": "check", "type": bool, "default": False, "help": "exit 1 if anything is stale"},
        {"name": "remote", "long": "remote", "type": bool, "default": False,
         "help": "say which stale artifacts the shared cache has"},
    )

    def _execute(self, as_json=False, check=False, remote=False):
        from buildplan import report

        plan = _session(self).plan
        stale = report.stale_nodes(plan)
        in_cache = report.in_cache(plan, stale) if remote else None
        manifest = _session(self).store.manifest_problem()
        self.dep_manager.close()
        text = json.dumps({**report.as_json(plan, stale, in_cache), "manifest": manifest}, indent=1) if as_json else \
            report.as_text(plan, stale, in_cache)
        if manifest and not as_json:
            text = f"{manifest}: any build (`doit`) or `doit verify --fix` rewrites it\n\n{text}"
        _print_to_a_pipe(text)
        return 1 if (check and (stale or manifest)) else 0


def verify_outputs(plan, fix: bool) -> dict[str, list[str]]:
    """node id -> problems of every built artifact whose outputs no longer match its record.
    With fix, their records are dropped: they are stale, and the next build redoes them."""
    from buildplan.state import Store

    store = Store(plan)
    damaged = {}
    for node in plan.nodes.values():
        problems = store.verify(node)
        if problems:
            damaged[node.id] = problems
            if fix:
                store.drop(node.id)
    manifest = store.manifest_problem()
    if manifest:
        damaged[MANIFEST] = [manifest]
    if fix and damaged:
        store.write_manifest()
    return damaged


class Verify(DoitCmdBase):
    name = "verify"
    builds = "with --fix"  # it drops records and rewrites the manifest then
    doc_purpose = "re-hash every built output against its record (bit rot, edits that kept the mtime)"
    doc_usage = "[--fix] [--json]"
    doc_description = ("Exit status 1 when any output differs from its record. --fix drops those records, "
                       "so the next build redoes exactly them.")
    cmd_options = (
        {"name": "fix", "long": "fix", "type": bool, "default": False, "help": "mark damaged artifacts stale"},
        {"name": "as_json", "long": "json", "type": bool, "default": False, "help": "machine-readable output"},
    )

    def _execute(self, fix=False, as_json=False):
        if fix:
            _session(self).begin_build()
        plan = _session(self).plan
        damaged = verify_outputs(plan, fix)
        self.dep_manager.close()
        if as_json:
            print(json.dumps({"damaged": damaged, "fixed": fix}, indent=1))
        else:
            for node_id, problems in damaged.items():
                fixed = " (rewritten)" if node_id == MANIFEST else " (record dropped: rebuilt by the next build)"
                print(f"{node_id}: damaged" + (fixed if fix else ""))
                for p in problems:
                    print(f"    - {p}")
            print(f"verify: {len(damaged)} damaged artifact(s)" + ("" if damaged else ", every recorded output matches"))
        return 1 if damaged else 0


class Prune(DoitCmdBase):
    name = "prune"
    builds = "unless --dry-run"
    doc_purpose = "remove artifacts the config no longer declares (e.g. a batch size taken out)"
    doc_usage = "[--dry-run]"
    doc_description = "Lists, then deletes, the outputs and records of undeclared artifacts; declared ones are never touched."
    cmd_options = (
        {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "only list them"},
    )

    def _execute(self, dry_run=False):
        from buildplan.state import undeclared

        if not dry_run:
            _session(self).begin_build()
        store = _session(self).store
        found = undeclared(store)
        for node_id, outputs in found.items():
            print(f"{'would remove' if dry_run else 'removing'} {node_id}: {', '.join(outputs) or '(record only)'}")
            if not dry_run:
                store.drop(node_id)  # the record first: an interrupted prune leaves nothing that looks built
                for rel in outputs:
                    (store.root / rel).unlink(missing_ok=True)
        if found and not dry_run:
            store.write_manifest()
        print(f"prune: {len(found)} undeclared artifact(s)" + (" (dry run)" if dry_run and found else ""))
        self.dep_manager.close()
        return 0


class Nightly(DaskRun):
    name = "nightly"
    doc_purpose = "build everything declared, continue past failures, write a dated JSON + HTML report"
    doc_usage = "[-n N] [--report-dir DIR]"
    doc_description = "Exit status 1 when any artifact failed. Targets without a toolchain are reported as skipped."
    cmd_options = DaskRun.cmd_options + (
        {"name": "report_dir", "long": "report-dir", "type": str, "default": "",
         "help": "where reports go (default: <artifacts>/reports)"},
    )

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False, dask_scheduler="", report_dir=""):
        from buildplan import nightly
        from buildplan.files import utc_now
        from buildplan.tasks import available_targets

        plan = _session(self).plan
        ok, skipped = available_targets(plan)
        started = utc_now()
        # bit rot first: a damaged output passes every cheap check (size, mtime) and would stay "fresh"
        damaged = verify_outputs(plan, fix=True)
        for node_id, problems in damaged.items():
            print(f"verify: {node_id} damaged ({'; '.join(problems)}): rebuilt tonight", file=sys.stderr)
        self.sel_tasks = [g for g in plan.groups if g.startswith("export:")] + [f"compile:{t}" for t in ok]
        super()._execute(outfile, verbosity=verbosity, always=always, continue_=True, reporter=reporter,
                         num_process=num_process, par_type=par_type, single=single,
                         auto_delayed_regex=auto_delayed_regex, force_verbosity=force_verbosity,
                         failure_verbosity=failure_verbosity, pdb=pdb, dask_scheduler=dask_scheduler)
        path, failed = nightly.write_report(plan, started, skipped, report_dir or None, damaged)
        print(f"nightly report: {path}.html (and .json); failed: {failed}", file=sys.stderr)
        cov = json.loads(Path(f"{path}.json").read_text())["coverage"]
        if cov["cells"]:
            print(f"coverage: {cov['accepted']} of {cov['cells']} cells built and accepted ({cov['share']:.0%})",
                  file=sys.stderr)
            for hole in cov["holes"]:
                print(f"  hole {hole['cell']}: {hole['status']}" + (f": {hole['reason']}" if hole["reason"] else ""),
                      file=sys.stderr)
        return 1 if failed else 0


class CacheCommand(DoitCmdBase):
    name = "cache"
    builds = "pull"  # the others read artifacts/ or write only the cache
    doc_purpose = "the shared artifact cache: status, push, pull, verify, gc"
    doc_usage = "status | push [TASK...] | pull [TASK...] | verify [--fix] | gc [--dry-run]"
    doc_description = (
        "status: where the cache is, whether it answers, what it holds, which declared artifacts it has.\n"
        "push: upload what is built and fresh (real toolchains only, never a stand-in's output).\n"
        "pull: fetch what is stale and in the cache, without building anything.\n"
        "verify: re-hash every stored file; report corrupt files and entries whose files are missing "
        "(--fix deletes them).\n"
        "gc: delete stored files no entry refers to.\n"
        "TASK may be a node or a group (compile:<target>, export:<model>); default: all declared.")
    cmd_options = (
        {"name": "fix", "long": "fix", "type": bool, "default": False, "help": "verify: delete what is damaged"},
        {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "gc: only list"},
    )

    def _execute(self, fix=False, dry_run=False, pos_args=None):
        from buildplan import cache_commands

        words = list(pos_args or [])
        # doit stops reading options at the first word: `cache gc --dry-run` arrives as words
        fix = fix or "--fix" in words
        dry_run = dry_run or "--dry-run" in words
        words = [w for w in words if w not in ("--fix", "--dry-run")]
        action = words.pop(0) if words else "status"
        if action == "pull":
            _session(self).begin_build()
        plan = _session(self).plan
        try:
            return cache_commands.run(action, plan, words, fix=fix, dry_run=dry_run)
        finally:
            self.dep_manager.close()
