"""Run a command; write the peak RSS (bytes) of its largest process to a file; exit with its code.

    python measure_rss.py OUT_FILE COMMAND [ARGS...]

The build process cannot measure this itself: a forked child's peak RSS starts at its parent's
size (the doit process may hold torch, ~700 MB), so every figure would be at least that. This
launcher is small once exec'd, and the command is forked from it.
"""
import resource
import signal
import subprocess
import sys


def _die_with_parent():
    """In the child before exec: SIGKILL it when this launcher dies, however it dies (a kill -9 of
    doit left TPU-MLIR running on after the build lock was free)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    _die_with_parent()  # the launcher itself dies with the doit process
    try:
        child = subprocess.Popen(argv, preexec_fn=_die_with_parent)
    except OSError as e:
        print(f"cannot run {argv[0]}: {e}", file=sys.stderr)
        return 127
    for sig in (signal.SIGTERM, signal.SIGINT):  # pass a stop on, then report as usual
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    with open(out, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))  # Linux: KiB
    return code


if __name__ == "__main__":
    sys.exit(main())
