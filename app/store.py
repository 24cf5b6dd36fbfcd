"""Content-addressed artifact store: every blob is addressed by its sha256.

Two backends with one interface:

- `LocalStore` (the default): blobs live at <store>/blobs/ab/<sha256>. Uploads are streamed into
  tmp/ while hashing and moved into place only after they are validated, so a half-written file is
  never visible under blobs/.
- `S3Store` (`MODELPRESS_ARTIFACTS=s3://bucket/prefix`): blobs live at <prefix>/blobs/ab/<sha256> in
  an S3-compatible bucket, sent with multipart uploads (an object appears only once complete) and read
  back as streams. tmp/ (uploads being received, job work folders) stays on local disk.

Readers that need a real file (the workers: ONNX Runtime, numpy) call `local_path(sha)`: the local
store answers its own file; the S3 store downloads the blob once into <store>/cache/ and checks its
sha256 before anyone sees it. Streams (downloads over HTTP, with ranges) use `open_range`.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from app.settings import Settings, get_settings

CHUNK = 1024 * 1024


class BlobMissing(FileNotFoundError):
    """The store has no blob with this digest (deleted, or never stored)."""


class BlobCorrupt(OSError):
    """A blob's bytes do not hash to its name."""


def check_sha256(sha256: str) -> str:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return sha256


class _ScratchSpace:
    """tmp/ on local disk, shared by both backends: uploads being received and job work folders.

    Every folder handed out holds an exclusive flock on its `.lock` for as long as it is in use, so that a
    process starting up (an API restarted mid-upload, a worker after a crash) removes what dead processes left
    and never a folder another live process is still writing (API processes and workers share tmp/).
    """

    root: Path
    tmp: Path
    LOCK = ".lock"
    # A folder this young may be between its creation and its lock.
    FRESH_S = 60.0

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A private scratch folder under tmp/, removed afterwards whatever happens."""
        path = Path(tempfile.mkdtemp(prefix="work-", dir=self.tmp))
        lock = open(path / self.LOCK, "wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path
        finally:
            lock.close()
            shutil.rmtree(path, ignore_errors=True)

    def clean_tmp(self) -> list[str]:
        """Remove what interrupted uploads and jobs left (called at start-up). Returns the names removed."""
        removed = []
        now = time.time()
        for child in self.tmp.iterdir():
            try:
                fresh = now - child.lstat().st_mtime < self.FRESH_S
            except FileNotFoundError:
                continue
            if child.is_dir() and not child.is_symlink():
                if not self._abandoned(child, fresh):
                    continue
                shutil.rmtree(child, ignore_errors=True)
            elif fresh:
                continue
            else:
                child.unlink(missing_ok=True)
            removed.append(child.name)
        return removed

    def _abandoned(self, folder: Path, fresh: bool) -> bool:
        try:
            lock = open(folder / self.LOCK, "rb")
        except FileNotFoundError:
            return not fresh
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live process holds it
            return True


class LocalStore(_ScratchSpace):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blobs / check_sha256(sha256)[:2] / sha256

    def local_path(self, sha256: str) -> Path:
        """A readable local file holding the blob: here, the blob's own file (no copy)."""
        return self.path(sha256)

    def put(self, src: Path, sha256: str | None = None, *, keep_source: bool = False) -> tuple[str, int, bool]:
        """Move (or copy) a finished file into place. Returns (sha256, size, created).

        A file inside the store (an upload spooled in tmp/) is moved unless `keep_source`;
        then it is hard-linked where it can be, so the caller's path stays valid.
        """
        if sha256 is None:
            sha256 = file_sha256(src)
        size = src.stat().st_size
        target = self.path(sha256)
        if target.is_file():
            return sha256, size, False
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{sha256}.{os.getpid()}.partial")
        if src.resolve().is_relative_to(self.root.resolve()) and not keep_source:
            os.replace(src, staged)
        elif keep_source and _try_link(src, staged):
            pass
        else:
            shutil.copyfile(src, staged)
        os.replace(staged, target)
        return sha256, size, True

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"blob {sha256} is not in the store") from None

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The blob's bytes start..end (inclusive; end None = to the end), in chunks.

        The file is opened now, so a missing blob raises here rather than halfway through a response.
        """
        try:
            fh = open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise BlobMissing(f"blob {sha256} is not in the store") from None
        return _file_chunks(fh, start, end)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


class S3Store(_ScratchSpace):
    """Blobs in an S3-compatible bucket; local disk holds only tmp/ and the download cache."""

    def __init__(self, root: Path, *, bucket: str, prefix: str, client, chunksize: int = 64 * 1024**2) -> None:
        from boto3.s3.transfer import TransferConfig

        self.root = root
        self.tmp = root / "tmp"
        self.cache = root / "cache"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client
        # Files above one part go up as multipart uploads, parts sent in parallel; the object becomes
        # visible only when CompleteMultipartUpload succeeds, so a reader never sees half a blob.
        self.transfer = TransferConfig(multipart_threshold=chunksize, multipart_chunksize=chunksize,
                                       max_concurrency=4, use_threads=True)

    def key(self, sha256: str) -> str:
        return f"{self.prefix}blobs/{check_sha256(sha256)[:2]}/{sha256}"

    def _cached(self, sha256: str) -> Path:
        return self.cache / check_sha256(sha256)[:2] / sha256

    def _head(self, sha256: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise BlobMissing(f"blob {sha256} is not in bucket {self.bucket}")
        return int(head["ContentLength"])

    def put(self, src: Path, sha256: str | None = None, *, keep_source: bool = False) -> tuple[str, int, bool]:
        """Upload a finished file (multipart above one part). Returns (sha256, size, created).

        The source file is left where it is (its folder under tmp/ is cleaned up by its owner).
        """
        if sha256 is None:
            sha256 = file_sha256(src)
        size = src.stat().st_size
        if self.exists(sha256):
            return sha256, size, False
        self.client.upload_file(str(src), self.bucket, self.key(sha256), Config=self.transfer,
                                ExtraArgs={"Metadata": {"sha256": sha256}})
        return sha256, size, True

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The blob's bytes start..end (inclusive; end None = to the end), streamed from GetObject.

        The request is made now, so a missing blob raises here rather than halfway through a response.
        """
        from botocore.exceptions import ClientError

        args = {"Bucket": self.bucket, "Key": self.key(sha256)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            body = self.client.get_object(**args)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise BlobMissing(f"blob {sha256} is not in bucket {self.bucket}") from None
            raise
        return _stream_chunks(body)

    def local_path(self, sha256: str) -> Path:
        """A local file holding the blob, downloaded once into cache/ and checked against its sha256.

        Concurrent callers (several worker processes) each download to their own partial file and
        rename it into place, so the cache never holds a partial or unverified blob.
        """
        cached = self._cached(sha256)
        if cached.is_file():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            try:
                self.client.download_file(self.bucket, self.key(sha256), str(partial), Config=self.transfer)
            except Exception as exc:
                from botocore.exceptions import ClientError

                if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
                        "404", "NoSuchKey", "NotFound"):
                    raise BlobMissing(f"blob {sha256} is not in bucket {self.bucket}") from None
                raise
            actual = file_sha256(partial)
            if actual != sha256:
                raise BlobCorrupt(f"blob {sha256} in bucket {self.bucket} has the sha256 {actual}: refusing it")
            os.replace(partial, cached)
        finally:
            partial.unlink(missing_ok=True)
        return cached

    # Readers written for the local store (a tokenizer file, say) get a verified local copy.
    path = local_path

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self._cached(sha256).unlink(missing_ok=True)


ArtifactStore = LocalStore | S3Store


def _file_chunks(fh: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
    with fh:
        fh.seek(start)
        left = None if end is None else end - start + 1
        while left is None or left > 0:
            chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _stream_chunks(body) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def _try_link(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
    except OSError:
        return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str = ""):
    """One boto3 client per endpoint (clients are thread-safe; building one costs tens of ms).

    Region and credentials come from boto3's usual chain (AWS_* variables, ~/.aws, instance role).
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    # Custom endpoints (MinIO, Ceph, moto) rarely have per-bucket DNS names.
                    s3={"addressing_style": "path"} if endpoint_url else {})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def make_store(settings: Settings) -> ArtifactStore:
    if settings.artifacts.startswith("s3://"):
        bucket, prefix = parse_s3_url(settings.artifacts)
        return S3Store(settings.store_path, bucket=bucket, prefix=prefix, client=s3_client(settings.s3_endpoint_url),
                       chunksize=settings.s3_multipart_chunksize)
    return LocalStore(settings.store_path)


def get_store() -> ArtifactStore:
    return make_store(get_settings())
