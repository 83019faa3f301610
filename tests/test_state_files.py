"""Small state-hygiene guarantees: files follow the umask, toolchain processes die with the build,
and scratch folders of killed runs are cleaned by the next build."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO, doit, executed, write_config

MODEL = [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3}, "graphs": ["BLIP_text"],
          "targets": {"ascend310p3": {"batch_sizes": [1]}}}]


def test_records_follow_the_umask_and_dead_runs_scratch_is_cleaned(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    dead = root / ".staging" / "onnx__m.999999999"  # a pid that cannot exist: a killed run's leftovers
    live = root / ".staging" / f"onnx__m.{os.getpid()}"
    for d in (dead, live):
        (d / "out").mkdir(parents=True)
    doit(cfg, "checkpoint:m")
    assert not dead.exists() and live.exists()
    for path in (root / ".state" / "checkpoint__m.json", root / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o022, path  # records were 0600 (mkstemp)


def _assert_dies(pid: int, message: str) -> None:
    """pid is gone within 5 s; else it is killed and the test fails with message."""
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(message)


def test_toolchain_process_dies_with_the_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, str(REPO / "buildplan" / "measure_rss.py"), str(tmp_path / "rss"),
                                 "sleep", "60"])
    deadline = time.time() + 10
    child = None
    while child is None and time.time() < deadline:
        out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        child = int(out[0]) if out else None
        time.sleep(0.05)
    assert child, "the launcher started no child"
    os.kill(launcher.pid, signal.SIGKILL)  # as when doit is killed: nobody forwards anything
    launcher.wait()
    _assert_dies(child, "the tool outlived its launcher")


def test_the_tools_own_children_die_with_the_build(tmp_path):
    """TPU-MLIR's model_deploy.py is a wrapper that starts Python, which starts tpuc-opt: a kill -9
    of doit killed the launcher and the wrapper, and left the rest compiling for minutes."""
    pidfile = tmp_path / "grandchild"
    build = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                              sys.executable, str(REPO / "buildplan" / "measure_rss.py"), str(tmp_path / "rss"),
                              "sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"])
    deadline = time.time() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    os.kill(build.pid, signal.SIGKILL)  # as `kill -9` of doit
    build.wait()
    _assert_dies(grandchild, "the tool's own child outlived the build")


def test_verify_finds_bit_rot_that_keeps_size_and_mtime(tmp_path):
    """A byte flipped with the mtime restored passed as fresh forever; `doit verify` re-hashes,
    `--fix` makes exactly that artifact stale, and the next build redoes it."""
    from conftest import executed

    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "export:m")
    assert doit(cfg, "verify").returncode == 0
    onnx = root / "m" / "onnx" / "BLIP_text.onnx"
    st = onnx.stat()
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert executed(doit(cfg, "export:m")) == []  # the cheap check cannot see it
    found = doit(cfg, "verify", check=False)
    assert found.returncode == 1 and "onnx:m: damaged" in found.stdout and "BLIP_text.onnx" in found.stdout
    doit(cfg, "verify", "--fix", check=False)
    assert executed(doit(cfg, "export:m")) == ["onnx:m"]
    assert doit(cfg, "verify").returncode == 0


def test_writes_never_follow_symlinks_out_of_artifacts(tmp_path):
    root = tmp_path / "artifacts"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "checkpoint:m")
    # a symlinked output folder: the export would land outside artifacts/
    (root / "m").mkdir()
    (root / "m" / "onnx").symlink_to(outside, target_is_directory=True)
    proc = doit(cfg, "onnx:m", check=False)
    assert proc.returncode != 0 and "is a symlink" in proc.stdout + proc.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    (root / "m" / "onnx").unlink()
    # a symlinked log file: its target would be overwritten
    (root / "logs" / "onnx__m.log").unlink(missing_ok=True)
    (root / "logs" / "onnx__m.log").symlink_to(outside / "precious.txt")
    proc = doit(cfg, "onnx:m", check=False)
    assert proc.returncode != 0 and "is a symlink" in proc.stdout + proc.stderr
    assert (outside / "precious.txt").read_text() == "keep me"
    (root / "logs" / "onnx__m.log").unlink()
    # a symlinked build lock
    (root / ".build.lock").unlink()
    (root / ".build.lock").symlink_to(outside / "precious.txt")
    proc = doit(cfg, "onnx:m", check=False)
    assert proc.returncode == 2 and "build lock" in proc.stderr
    assert (outside / "precious.txt").read_text() == "keep me"
    (root / ".build.lock").unlink()
    doit(cfg, "onnx:m")


def test_undeclared_artifacts_leave_the_manifest_and_prune_removes_them(tmp_path):
    import json

    root = tmp_path / "artifacts"
    two = [{**MODEL[0], "targets": {"ascend310p3": {"batch_sizes": [1, 2]}}}]
    cfg = write_config(tmp_path / "models.yaml", two, root)
    doit(cfg, "export:m")
    bs2 = root / "m" / "onnx" / "BLIP_text_bs2.onnx"
    assert bs2.exists()
    write_config(cfg, MODEL, root)  # batch size 2 taken out
    doit(cfg, "export:m")
    listed = {a["path"] for a in json.loads((root / "manifest.json").read_text())["artifacts"]}
    assert "m/onnx/BLIP_text_bs2.onnx" not in listed and "m/onnx/BLIP_text_bs1.onnx" in listed
    dry = doit(cfg, "prune", "--dry-run")
    assert "would remove simplify:m.BLIP_text.bs2" in dry.stdout and bs2.exists()
    doit(cfg, "prune")
    assert not bs2.exists() and not (root / ".state" / "simplify__m.BLIP_text.bs2.json").exists()
    assert (root / "m" / "onnx" / "BLIP_text_bs1.onnx").exists()
    assert executed(doit(cfg, "export:m")) == []


def test_each_command_takes_the_lock_only_if_it_builds(tmp_path):
    """Commands declare whether they build; the lock was decided by re-parsing argv against a
    hand-kept list of doit options (`-f dodo.py list` took it: `dodo.py` looked like a task)."""
    import fcntl

    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "export:m")
    with open(root / ".build.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another build is running
        for args in (["-f", "dodo.py", "list"], ["stale", "--json"], ["verify"], ["prune", "--dry-run"],
                     ["info", "onnx:m"], ["cache", "status"]):
            proc = doit(cfg, *args, check=False)
            assert "another build is running" not in proc.stderr, (args, proc.stderr)
        for args in ([], ["-n", "2", "export:m"], ["verify", "--fix"], ["nightly", "--report-dir", str(tmp_path / "r")],
                     ["prune"], ["clean", "onnx:m"], ["-f", "dodo.py"]):
            proc = doit(cfg, *args, check=False)
            assert proc.returncode == 3 and "another build is running" in proc.stderr, (args, proc.stderr)
    assert (root / "m" / "onnx" / "BLIP_text.onnx").exists()  # clean was refused, nothing removed


@pytest.mark.parametrize("damage", ["garbage", "deleted", "edited"])
def test_a_damaged_or_deleted_manifest_is_reported_and_repaired(tmp_path, damage):
    """The manifest is what consumers read: damaged or gone, `doit` said nothing to do, verify
    said 0 damaged and `stale --check` exited 0, until something rebuilt."""
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, atc=True)
    doit(cfg, atc=True)  # a replayed no-op from here on
    assert doit(cfg, "stale", "--check", atc=True).returncode == 0
    manifest = root / "manifest.json"
    good = json.loads(manifest.read_text())
    assert {a["node"].split(":")[0] for a in good["artifacts"]} == {"checkpoint", "onnx", "simplify", "om"}
    if damage == "garbage":
        manifest.write_bytes(b"\xff\xfe")
    elif damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text(json.dumps({"artifacts": good["artifacts"][:1]}))
    check = doit(cfg, "stale", "--check", atc=True, check=False)
    assert check.returncode == 1 and "manifest.json" in check.stdout, check.stdout
    assert json.loads(doit(cfg, "stale", "--json", atc=True, check=False).stdout)["manifest"]
    found = doit(cfg, "verify", atc=True, check=False)
    assert found.returncode == 1 and "manifest.json" in found.stdout, found.stdout
    assert damage != "garbage" or manifest.read_bytes() == b"\xff\xfe"  # verify without --fix only reads
    proc = doit(cfg, atc=True)
    assert executed(proc) == [] and json.loads(manifest.read_text()) == good  # a no-op repairs it
    assert doit(cfg, "stale", "--check", atc=True).returncode == 0 and doit(cfg, "verify", atc=True).returncode == 0


def test_verify_fix_repairs_the_manifest_and_reports_unreadable_records(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "export:m")
    (root / "manifest.json").unlink()
    (root / ".state" / "onnx__m.json").write_text("{not json")
    found = doit(cfg, "verify", check=False)
    assert found.returncode == 1 and "onnx:m" in found.stdout and "unreadable" in found.stdout, found.stdout
    assert "0 damaged" not in found.stdout
    doit(cfg, "verify", "--fix", check=False)
    assert (root / "manifest.json").exists()
    assert executed(doit(cfg, "export:m")) == ["onnx:m"]
    assert doit(cfg, "verify").returncode == 0


def test_verify_says_what_changed_about_a_damaged_output(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "export:m")
    onnx = root / "m" / "onnx" / "BLIP_text.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))  # same size, new mtime
    found = doit(cfg, "verify", check=False).stdout
    assert "BLIP_text.onnx" in found and "mtime unchanged" not in found and "modified" in found, found


def test_scratch_of_a_dead_but_unreaped_worker_is_cleaned(tmp_path):
    """After a kill -9 of `doit -n 2`, its workers can linger as zombies, which os.kill(pid, 0)
    counts as alive: their scratch folders were kept forever."""
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while time.time() < deadline and open(f"/proc/{zombie.pid}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.05)
    scratch = root / ".staging" / f"onnx__m.{zombie.pid}"
    (scratch / "out").mkdir(parents=True)
    try:
        doit(cfg, "checkpoint:m")
        assert not scratch.exists()
    finally:
        zombie.wait()


def test_doit_clean_removes_outputs_record_and_manifest_entry(tmp_path):
    """`doit clean` raised NameError (swallowed by doit): the outputs stayed while the record went."""
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "export:m")
    onnx = root / "m" / "onnx" / "BLIP_text.onnx"
    assert onnx.exists()
    proc = doit(cfg, "clean", "onnx:m")
    assert "Traceback" not in proc.stdout + proc.stderr and "NameError" not in proc.stdout + proc.stderr
    assert not onnx.exists() and not (root / ".state" / "onnx__m.json").exists()
    listed = {a["node"] for a in json.loads((root / "manifest.json").read_text())["artifacts"]}
    assert "onnx:m" not in listed and "checkpoint:m" in listed
    assert executed(doit(cfg, "export:m")) == ["onnx:m"]  # a rebuild rebuilds it (its bs1 graph is unchanged)
