"""A full disk: the build fails saying so and naming the path, loses nothing already built, and
never bricks the project (doit's own .doit.db was left empty and every later run died)."""
import os
import shutil
import subprocess

import pytest

from conftest import doit, executed, write_config

MODEL = [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3},
          "graphs": ["BLIP_text", "BLIP_image"], "targets": {"ascend310p3": {"batch_sizes": [1]}}}]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt, leave_bytes):
    free = shutil.disk_usage(mnt).free
    filler = mnt / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_out_of_space_says_so_and_loses_nothing(small_disk, tmp_path):
    root = small_disk / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", MODEL, root)
    doit(cfg, "checkpoint:m")
    ckpt = (root / "checkpoints" / "m.pth").read_bytes()
    filler = _fill(small_disk, 200_000)  # room for logs and records, not for the ONNX graphs
    failed = doit(cfg, "export:m", check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "out of disk space" in out and str(root) in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # nothing built was lost, the half-written work is gone, and the project is not wedged
    assert (root / "checkpoints" / "m.pth").read_bytes() == ckpt
    assert not [p for p in (root / ".staging").glob("*")] if (root / ".staging").exists() else True
    stale = doit(cfg, "stale", check=False)
    assert stale.returncode in (0, 1) and "Traceback" not in stale.stderr + stale.stdout
    filler.unlink()
    again = doit(cfg, "export:m")
    assert "checkpoint:m" not in executed(again) and "onnx:m" in executed(again)


def test_damaged_doit_database_is_set_aside(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", MODEL[:1], tmp_path / "artifacts")
    doit(cfg, "checkpoint:m")
    db = tmp_path / "artifacts" / ".doit.db"
    for damage in (b"", b"\xff\xfe garbage", b"[]"):
        db.write_bytes(damage)
        proc = doit(cfg, "checkpoint:m")
        assert executed(proc) == [] and "Traceback" not in proc.stderr  # our records decide, not doit's db
        assert doit(cfg, "stale", check=False).returncode in (0, 1)
