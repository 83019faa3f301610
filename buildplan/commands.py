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
    doc_usage = "[-n N] [--report-dir DIR] [--publish]"
    doc_description = ("Exit status 1 when any artifact failed. Targets without a toolchain are reported as skipped. "
                       "--publish: then publish what is built and accepted as a release (`doit publish` with models.yaml's "
                       "`releases:` block); the report links it.")
    cmd_options = DaskRun.cmd_options + (
        {"name": "report_dir", "long": "report-dir", "type": str, "default": "",
         "help": "where reports go (default: <artifacts>/reports)"},
        {"name": "publish", "long": "publish", "type": bool, "default": False,
         "help": "publish a release of tonight's accepted deliverables"},
    )

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False, dask_scheduler="", report_dir="", publish=False):
        from buildplan import nightly, releases
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
        release = None
        if publish:
            try:
                where = releases.settings(plan.config.releases)
                release = releases.publish(plan, _session(self).store, where, log=lambda m: print(m, file=sys.stderr))
            except (releases.ReleaseError, releases.StoreUnavailable) as e:
                print(f"nightly: not published: {e}", file=sys.stderr)
                release = {"error": str(e)}
        path, failed = nightly.write_report(plan, started, skipped, report_dir or None, damaged, release)
        print(f"nightly report: {path}.html (and .json); failed: {failed}", file=sys.stderr)
        cov = json.loads(Path(f"{path}.json").read_text())["coverage"]
        if cov["cells"]:
            print(f"coverage: {cov['accepted']} of {cov['cells']} cells built and accepted ({cov['share']:.0%})",
                  file=sys.stderr)
            for hole in cov["holes"]:
                print(f"  hole {hole['cell']}: {hole['status']}" + (f": {hole['reason']}" if hole["reason"] else ""),
                      file=sys.stderr)
        return 1 if failed or (release or {}).get("error") else 0


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


def _late_options(cmd, given: dict, pos_args) -> tuple[dict, list[str]]:
    """doit stops reading options at the first word (`doit fetch nightly --dest d`): the command's
    options found among the words, over those doit parsed; and the remaining words."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"doit {cmd.name}", add_help=False)
    for opt in cmd.cmd_options:
        if opt["type"] is bool:
            parser.add_argument(f"--{opt['long']}", dest=opt["name"], action="store_true", default=None)
        else:
            parser.add_argument(f"--{opt['long']}", dest=opt["name"], type=opt["type"], default=None)
    try:
        late, words = parser.parse_known_args(list(pos_args or []))
    except SystemExit:
        raise SystemExit(2) from None  # argparse said what was wrong
    unknown = [w for w in words if w.startswith("--")]
    if unknown:
        raise SystemExit(f"error: doit {cmd.name}: unknown option {unknown[0]} (see `doit help {cmd.name}`)")
    return {**given, **{k: v for k, v in vars(late).items() if v is not None}}, words


class Publish(DoitCmdBase):
    name = "publish"
    builds = "unless --dry-run"  # it holds the build lock: no build changes a file while it is uploaded
    doc_purpose = "publish the built, accepted deliverables as a new immutable release version"
    doc_usage = "[--channel C] [--to URL] [--keep N] [--dry-run] [TARGET...]"
    doc_description = (
        "Uploads every declared deliverable (the members of compile:<target>) that is built, fresh and accepted "
        "to <store>/<channel>/versions/<version>/, with a manifest (sha256, size, fingerprint, figures, toolchains), "
        "then moves <channel>/latest.json. Stand-in, failed and stale artifacts are left out and listed. "
        "--keep N then deletes all but the newest N versions of the channel. Store and channel default to "
        "models.yaml's `releases:` block (BLIPC_RELEASES_URL overrides the url).")
    cmd_options = (
        {"name": "channel", "long": "channel", "type": str, "default": "", "help": "release channel (default: nightly)"},
        {"name": "to", "long": "to", "type": str, "default": "", "help": "store: s3://bucket/prefix or a directory"},
        {"name": "keep", "long": "keep", "type": int, "default": 0, "help": "then keep the newest N versions"},
        {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "only list what would happen"},
    )

    def _execute(self, channel="", to="", keep=0, dry_run=False, pos_args=None):
        from buildplan import releases

        given = {"channel": channel, "to": to, "keep": keep, "dry_run": dry_run}
        opts, targets = _late_options(self, given, pos_args)
        session = _session(self)

        def run():
            where = releases.settings(session.plan.config.releases, opts["to"] or None, opts["channel"] or None,
                                      opts["keep"] or None)
            if not opts["dry_run"]:
                session.begin_build()
            releases.publish(session.plan, session.store, where, targets or None, opts["dry_run"])
            return 0

        try:
            return releases.catch(run)
        finally:
            self.dep_manager.close()


class Fetch(DoitCmdBase):
    name = "fetch"
    builds = False
    doc_purpose = "download a published release (a channel's latest, or channel/version), verified"
    doc_usage = "CHANNEL | CHANNEL/VERSION [--target T] [--dest DIR] [--from URL]"
    doc_description = ("Every file is checked against the manifest's size and sha256 before it takes its name; an "
                       "interrupted fetch resumes where it stopped. The manifest is written as DIR/release.json.")
    cmd_options = (
        {"name": "target", "long": "target", "type": str, "default": "", "help": "only this target's files"},
        {"name": "dest", "long": "dest", "type": str, "default": "", "help": "where to (default: ./release-<channel>)"},
        {"name": "source", "long": "from", "type": str, "default": "", "help": "store: s3://bucket/prefix or a directory"},
    )

    def _execute(self, target="", dest="", source="", pos_args=None):
        from buildplan import releases

        opts, words = _late_options(self, {"target": target, "dest": dest, "source": source}, pos_args)
        target, dest, source = opts["target"], opts["dest"], opts["source"]
        self.dep_manager.close()
        if len(words) != 1:
            print("error: name one release: a channel (its latest) or <channel>/<version>; see `doit releases`",
                  file=sys.stderr)
            return 2

        def run():
            where = releases.settings(_session(self).plan.config.releases, source or None)
            out = Path(dest or f"release-{words[0].split('/')[0]}")
            releases.fetch(where["url"], words[0], out, target or None)
            return 0

        return releases.catch(run)


class Releases(DoitCmdBase):
    name = "releases"
    builds = False
    doc_purpose = "list the release store's channels and versions, or prune old versions"
    doc_usage = "[list] [CHANNEL] | prune [--keep N] [--dry-run] [CHANNEL]"
    doc_description = ("list: per channel, its versions (complete or an unfinished upload), sizes and which is latest. "
                       "prune: keep the newest N complete versions (and the latest) of a channel, delete the rest and "
                       "unfinished uploads older than 6 h.")
    cmd_options = (
        {"name": "keep", "long": "keep", "type": int, "default": 0, "help": "prune: versions to keep (default: releases.keep)"},
        {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "prune: only list"},
        {"name": "source", "long": "from", "type": str, "default": "", "help": "store: s3://bucket/prefix or a directory"},
    )

    def _execute(self, keep=0, dry_run=False, source="", pos_args=None):
        from buildplan import releases
        from buildplan.stores import open_store

        opts, words = _late_options(self, {"keep": keep, "dry_run": dry_run, "source": source}, pos_args)
        keep, dry_run, source = opts["keep"], opts["dry_run"], opts["source"]
        action = words.pop(0) if words and words[0] in ("list", "prune") else "list"
        configured = _session(self).plan.config.releases
        self.dep_manager.close()

        def run():
            where = releases.settings(configured, source or None, words[0] if words else None, keep or None)
            store = open_store(where["url"])
            store.check(writing=False)
            if action == "prune":
                if not where["keep"]:
                    raise releases.ReleaseError("prune: say how many versions to keep (--keep N or releases.keep)")
                releases.prune(store, where["channel"], where["keep"], dry_run)
                return 0
            for channel in [where["channel"]] if words else releases.channels(store):
                latest = (releases.read_json(store, releases.pointer(channel)) or {}).get("version")
                print(f"{channel} (latest: {latest or 'none'})")
                for v in releases.versions(store, channel):
                    state = "latest" if v["version"] == latest else "complete" if v["complete"] else "unfinished upload"
                    print(f"  {v['version']}  {v['files']:4d} file(s) {v['bytes'] / 2**20:9.1f} MiB  {state}")
            return 0

        return releases.catch(run)
