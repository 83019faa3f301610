"""The build as a person sees it: one line per task that ran (status, time, key figure), a live
line with elapsed time and an ETA (from the duration the last build of the same artifact took)
while a task runs on a terminal, and a closing summary.

A doit reporter plugin ("blipc", registered in pyproject.toml). Plain ANSI, no terminal library:
the reporter is loaded by every `doit`, a no-op included, and rich's import alone would cost
more than the whole no-op budget allows. Without a terminal (CI logs) there is no live line.
"""
from __future__ import annotations

import threading
import time

from doit.reporter import ConsoleReporter


def _root():
    from buildplan.session import current

    return current().root if current() else None


def _skipped_targets() -> dict:
    from buildplan.session import current

    return current().skipped_targets() if current() else {}


def _is_artifact(name: str) -> bool:
    return ":" in name and not name.startswith(("toolchain:", "compile:", "export:", "default"))


def _record(root, node_id: str) -> dict | None:
    from buildplan.files import read_json, safe_name

    return read_json(f"{root}/.state/{safe_name(node_id)}.json") if root else None


def key_figure(data: dict | None) -> str:
    """What a person wants to see of a finished artifact, in a few words."""
    from buildplan.records import Record

    rec = Record.from_json(data)
    if rec is None:
        return ""
    words = []
    if rec.from_cache is not None:
        words.append(f"pulled from the cache ({rec.from_cache.get('bytes', 0) / 2**20:.1f} MiB)")
    figure = rec.result.acceptance_figure()
    if figure:
        if "identical_sequences" in figure:  # a decoder's token agreement (compile/acceptance.py)
            words.append(f"tokens: {figure['identical_sequences']:.0%} of sequences identical" + (
                f", {figure['next_token_agreement']:.1%} of next tokens" if "next_token_agreement" in figure else ""))
        else:
            words.append(f"match {figure['match']:.0%}" if "match" in figure else f"cosine {figure['cosine']:.6f}")
    if rec.result.summary:
        words.append(rec.result.summary)
    if rec.is_standin:
        words.append("STAND-IN, not a real compile")
    if rec.worker is not None:
        words.append(f"on worker {rec.worker}")
    size = sum(o.get("size", 0) for o in rec.outputs.values())
    if size:
        words.append(f"{size / 2**20:.1f} MiB")
    return ", ".join(words)


class BuildReporter(ConsoleReporter):
    desc = "one line per task, a live line with an ETA on a terminal, and a summary"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.tty = hasattr(outstream, "isatty") and outstream.isatty()
        self.started = time.monotonic()
        self.running: dict[str, tuple[float, float | None]] = {}  # task -> (start, expected seconds)
        self.built: list[str] = []
        self.pulled = 0
        self.up_to_date = 0
        self.failed: list[tuple[str, str]] = []
        self.blocked = 0  # artifacts not attempted: something they need failed
        self.default_ran = False
        self.total = 0  # artifact tasks this run selected, built or not
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._live = False

    # --- doit's callbacks -------------------------------------------------------------
    def initialize(self, tasks, selected_tasks):
        seen, todo = set(), list(selected_tasks or ())
        while todo:
            name = todo.pop()
            if name in seen or name not in tasks:
                continue
            seen.add(name)
            todo.extend(tasks[name].task_dep)
        self.total = sum(map(_is_artifact, seen))

    def execute_task(self, task):
        if not task.actions or not _is_artifact(task.name):
            return
        rec = _record(_root(), task.name)
        with self._lock:
            self.running[task.name] = (time.monotonic(), rec.get("duration_s") if rec else None)
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def add_success(self, task):
        self.default_ran |= task.name == "default"
        start = self._finish(task.name)
        if start is None:
            return
        rec = _record(_root(), task.name)
        self.built.append(task.name)
        self.pulled += bool(rec and "from_cache" in rec)
        figure = key_figure(rec)
        self._line(f".  {task.name}  {time.monotonic() - start:.1f} s" + (f"  {figure}" if figure else ""))

    def add_failure(self, task, fail):
        start = self._finish(task.name)
        if not fail.report:
            return
        if fail.get_name() == "UnmetDependency":  # not attempted: its own failure was already shown
            self.blocked += _is_artifact(task.name)
            return
        first, *rest = (fail.get_msg().strip() or fail.get_name()).splitlines()
        log = next((line.strip()[len("log: "):] for line in rest if line.strip().startswith("log: ")), "")
        self.failed.append((task.name, log))
        took = f"  {time.monotonic() - start:.1f} s" if start is not None else ""
        self._line(f"F  {task.name}{took}  {first}" + "".join(f"\n   {line.strip()}" for line in rest if line.strip()))

    def skip_uptodate(self, task):
        if task.actions and _is_artifact(task.name):
            self.up_to_date += 1

    def skip_ignore(self, task):
        pass

    def complete_run(self):
        self._clear_live()
        if not (self.built or self.failed) and not self.runtime_errors:
            self.write(f"nothing to do: {self.up_to_date} artifacts up to date\n" if self.up_to_date else "")
            return
        parts = [f"built {len(self.built) - self.pulled}"] + ([f"pulled {self.pulled}"] if self.pulled else []) + \
            [f"up to date {self.up_to_date}", f"failed {len(self.failed)}"] + \
            ([f"not attempted {self.blocked} (they need what failed)"] if self.blocked else [])
        self.write(f"summary: {', '.join(parts)} in {time.monotonic() - self.started:.1f} s; "
                   f"artifacts in {_root()}\n")
        for name, log in self.failed:
            self.write(f"  failed {name}" + (f": log {log}" if log else "") + "\n")
        if not self.default_ran:  # the default task says this itself when it gets to run
            for target, why in _skipped_targets().items():
                self.write(f"  skipped compile:{target}: {why}\n")
        if self.runtime_errors:
            self.write("Execution aborted.\n" + "\n".join(self.runtime_errors) + "\n")

    # --- the live line -----------------------------------------------------------------
    def _finish(self, name: str) -> float | None:
        with self._lock:
            entry = self.running.pop(name, None)
        return entry[0] if entry else None

    def _line(self, text: str) -> None:
        with self._lock:
            self._clear_live()
            self.write(text + "\n")
            self.outstream.flush()

    def _clear_live(self) -> None:
        if self._live:
            self.outstream.write("\r\033[K")
            self._live = False

    def _tick(self) -> None:
        from buildplan import executor

        while True:
            time.sleep(1)
            where = executor.current().running_on()  # a scheduler query, outside the lock
            with self._lock:
                if not self.running:
                    continue
                now = time.monotonic()
                shown = []
                for name, (start, expected) in list(self.running.items())[:3]:
                    elapsed = now - start
                    eta = f", ~{max(expected - elapsed, 0):.0f} s left" if expected else ""
                    place = (f" on worker {where[name]}" if name in where else " waiting for a worker or memory") \
                        if executor.remote() else ""
                    shown.append(f"{name} {elapsed:.0f} s{eta}{place}")
                done = len(self.built) + len(self.failed) + self.up_to_date + self.blocked
                counted = f"[{done}/{self.total}] " if self.total else ""
                self.outstream.write("\r\033[K> " + (counted + " | ".join(shown))[:200])
                self.outstream.flush()
                self._live = True
