"""Content-addressed artifact store on local disk: every blob lives at blobs/ab/<sha256>.

Uploads are streamed into tmp/ while hashing and moved into place only after they
are validated, so a half-written file is never visible under blobs/.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.settings import get_settings

CHUNK = 1024 * 1024


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A private scratch folder under tmp/, removed afterwards whatever happens."""
        path = Path(tempfile.mkdtemp(prefix="work-", dir=self.tmp))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

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

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def clean_tmp(self) -> None:
        """Remove leftovers of interrupted uploads (called at start-up)."""
        for child in self.tmp.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


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


def get_store() -> LocalStore:
    return LocalStore(get_settings().store_path)
