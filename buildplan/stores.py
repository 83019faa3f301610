"""Where shared files live: a directory (a shared or network filesystem) or S3-compatible object
storage through boto3. The artifact cache (buildplan/cache.py) and the releases
(buildplan/releases.py) both keep their files in one of these, by name ("ac/<key>.json",
"nightly/latest.json"); neither knows which kind of store it has.

Every write is atomic for a reader: a name holds the old bytes or the new ones, never a part
(a directory writes a hidden temporary file and renames it; an S3 PUT is atomic by itself).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from buildplan.core import BuildError

CHUNK = 1 << 22
MULTIPART = 64 << 20  # S3 uploads above this go in parallel parts; memory stays at a few chunks


class StoreUnavailable(BuildError):
    """The store cannot be used at all (unreachable, refused credentials, no such bucket)."""


class Transfer(NamedTuple):
    bytes: int
    seconds: float

    def __str__(self):
        return f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s ({self.bytes / 2**20 / max(self.seconds, 1e-6):.0f} MiB/s)"


def check_url(url: str, field: str, file: str, what: str = "store") -> None:
    """Refuse a URL no store can serve, before any work starts."""
    from buildplan.core import ConfigError

    if url.startswith("s3://"):
        bucket = url[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise ConfigError(file, field, f"{url!r} names no bucket", "write s3://<bucket>[/<prefix>]")
    elif "://" in url:
        raise ConfigError(file, field, f"unknown {what} scheme {url.split('://', 1)[0]!r} in {url!r}",
                          "use s3://<bucket>[/<prefix>] or a directory path (a shared or network filesystem)")


def open_store(url: str):
    return S3Store(url) if url.startswith("s3://") else DirStore(url)


class DirStore:
    """A directory, e.g. on a shared or network filesystem."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser()
        self.name = str(self.root)

    def check(self, writing: bool, folders: tuple[str, ...] = ()) -> None:
        """Usable for reading (and writing): for reading, each of `folders` must exist."""
        if writing:
            try:
                for folder in folders or ("",):
                    (self.root / folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreUnavailable(f"cannot create {self.root}: {e.strerror}") from None
            if not os.access(self.root / (folders[0] if folders else ""), os.W_OK):
                raise StoreUnavailable(f"{self.root} is not writable")
        elif not self.root.is_dir() or not all((self.root / f).is_dir() for f in folders):
            raise StoreUnavailable(f"{self.root} does not exist or is not what it should be"
                                   + (f" (no {'/, '.join(folders)}/ folder)" if folders else ""))

    def link(self, name: str) -> str:
        return str(self.root / name)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, name: str, data: bytes, create_only: bool = False) -> bool:
        """Write `name` atomically; with create_only, False when it already exists (first writer wins)."""
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(final, data)
        try:
            if create_only:
                os.link(tmp, final)  # atomic, and fails if it exists
            else:
                os.replace(tmp, final)
                tmp = None
            return True
        except FileExistsError:
            return False
        finally:
            if tmp:
                os.unlink(tmp)

    def upload(self, name: str, path: Path) -> Transfer:
        start = time.monotonic()
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name[:40]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return Transfer(path.stat().st_size, time.monotonic() - start)

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open(self, name: str, offset: int = 0):
        """A readable stream of `name` from byte `offset`, or None when it does not exist."""
        try:
            f = open(self.root / name, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        f.seek(offset)
        return f

    def list(self, prefix: str):
        """(name relative to prefix, size) of every file under `prefix`, temporary files left out."""
        top = self.root / prefix
        if not top.is_dir():
            return
        for folder, dirs, names in os.walk(top):
            dirs.sort()
            for n in sorted(names):
                if not n.startswith("."):
                    p = Path(folder) / n
                    with contextlib.suppress(FileNotFoundError):
                        yield str(p.relative_to(top)), p.stat().st_size

    def delete(self, name: str, up_to: str | None = None) -> None:
        """Delete `name`; with up_to (a folder above it), the folders it leaves empty below up_to too."""
        p = self.root / name
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        if up_to is not None:
            stop = self.root / up_to
            with contextlib.suppress(OSError):  # not empty: stop there
                for parent in p.parents:
                    if parent == stop or stop not in parent.parents:
                        break
                    parent.rmdir()

    def _tmp(self, final: Path, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name[:40]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


class S3Store:
    """S3-compatible object storage through boto3 (AWS, MinIO, Ceph, SeaweedFS...). Credentials and
    the endpoint come from boto3's standard chain (AWS_* variables, ~/.aws, instance roles;
    AWS_ENDPOINT_URL for a non-AWS server), never from models.yaml."""

    def __init__(self, url: str):
        rest = url[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.name = url
        import boto3
        from botocore.config import Config

        # short timeouts and few retries: an unreachable store must cost seconds, not minutes
        self.client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=60,
                                                       retries={"max_attempts": 2, "mode": "standard"}))

    def _key(self, name: str) -> str:
        return self.prefix + name

    def link(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _call(self, fn, *args, **kwargs):
        """fn(...), with what makes the whole store unusable turned into StoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(*args, **kwargs)
        except NoCredentialsError:
            raise StoreUnavailable("no credentials (boto3 found none: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                   "or a profile)") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound", "PreconditionFailed", "412", "InvalidRange", "416"):
                raise
            if code == "NoSuchBucket":
                raise StoreUnavailable(f"bucket {self.bucket!r} does not exist") from None
            if status in (401, 403):
                raise StoreUnavailable(f"credentials refused ({code or status})") from None
            raise StoreUnavailable(f"{code or status}: {e}") from None
        except BotoCoreError as e:
            raise StoreUnavailable(str(e)) from None

    def check(self, writing: bool, folders: tuple[str, ...] = ()) -> None:
        self._call(self.client.head_bucket, Bucket=self.bucket)

    def get(self, name: str) -> bytes | None:
        body = self.open(name)
        return None if body is None else body.read()

    def put(self, name: str, data: bytes, create_only: bool = False) -> bool:
        from botocore.exceptions import ClientError

        try:  # create-only: If-None-Match makes the server refuse a second writer (412)
            self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(name), Body=data,
                       **({"IfNoneMatch": "*"} if create_only else {}))
            return True
        except ClientError:
            return False

    def upload(self, name: str, path: Path) -> Transfer:
        from boto3.s3.transfer import TransferConfig

        start = time.monotonic()
        # streamed from the file, in parallel parts above MULTIPART: memory stays flat
        self._call(self.client.upload_file, str(path), self.bucket, self._key(name),
                   Config=TransferConfig(multipart_threshold=MULTIPART, multipart_chunksize=MULTIPART, max_concurrency=4))
        return Transfer(path.stat().st_size, time.monotonic() - start)

    def size(self, name: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(name))["ContentLength"]
        except ClientError:
            return None

    def open(self, name: str, offset: int = 0):
        from botocore.exceptions import ClientError

        try:
            return self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(name),
                              **({"Range": f"bytes={offset}-"} if offset else {}))["Body"]
        except ClientError:
            return None

    def list(self, prefix: str):
        top = self._key(prefix.rstrip("/") + "/" if prefix else "")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=top)
        for page in self._call(list, pages):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(top):], obj["Size"]

    def delete(self, name: str, up_to: str | None = None) -> None:  # S3 has no folders to leave behind
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(name))
