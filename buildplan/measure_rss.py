"""Run a command; write the peak RSS (bytes) of its largest process to a file; exit with its code.

    python measure_rss.py OUT_FILE COMMAND [ARGS...]

The build process cannot measure this itself: a forked child's peak RSS starts at its parent's
size (the doit process may hold torch, ~700 MB), so every figure would be at least that. This
launcher is small once exec'd, and the command is forked from it.
"""
import contextlib
import os
import resource
import signal
import subprocess
import sys


def _die_with_parent(sig: int = signal.SIGKILL):
    """Get `sig` when the parent dies, however it dies (a kill -9 of doit left TPU-MLIR running on
    after the build lock was free)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    # Told (SIGTERM, catchable) when doit dies: the handler below then stops the tool's whole
    # process group. model_deploy.py is a wrapper that starts Python, which starts tpuc-opt: a
    # death signal reaches only the direct child.
    _die_with_parent(signal.SIGTERM)
    try:
        child = subprocess.Popen(argv, preexec_fn=_die_with_parent, process_group=0)
    except OSError as e:
        print(f"cannot run {argv[0]}: {e}", file=sys.stderr)
        return 127

    def stop(sig, _frame):  # pass a stop on to every process of the tool, then report as usual
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    code = child.wait()
    with contextlib.suppress(ProcessLookupError):  # whatever the tool left running
        os.killpg(child.pid, signal.SIGKILL)
    with open(out, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))  # Linux: KiB
    return code


if __name__ == "__main__":
    sys.exit(main())
