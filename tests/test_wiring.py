"""How the pieces are wired (issue 22): one checkout's environment never runs another checkout's
build; the layers point one way, with no import cycle."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO, repo_copy

BIN = Path(sys.executable).parent


def test_another_checkouts_environment_is_refused(tmp_path):
    """A .venv made in checkout A (an editable install) silently built A's models.yaml with A's
    code when run in checkout B."""
    other = repo_copy(tmp_path / "other-checkout")
    proc = subprocess.run([str(BIN / "doit"), "list"], cwd=other, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(other) in proc.stderr and str(REPO) in proc.stderr and "./bootstrap.sh" in proc.stderr
    assert proc.stdout == ""
