"""Blob rows and files together: keep an upload once per content, drop a blob nothing points at.

Models, datasets and artifacts all reference content-addressed blobs (app/store.py holds the
files); a blob row and its file live exactly as long as something points at them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dbmodels import Artifact, Blob, Dataset, Model
from app.store import ArtifactStore
from app.uploads import Received

Row = TypeVar("Row")


def keep_upload(*, db: Session, store: ArtifactStore, received: Received, make_row: Callable[[str, int], Row],
                check: Callable[[], object] | None = None,
                before_commit: Callable[[Row], object] | None = None) -> Row:
    """Store a validated upload's bytes (once per content) and commit the row make_row(sha256, size) builds.
    check() runs once the bytes are stored, in the transaction (the quota, under its lock); before_commit(row)
    runs in it too, once the row has its id (the audit entry).

    When anything fails, nothing is kept: the transaction is rolled back and a file this call
    created is deleted unless another row points at it.
    """
    sha, size, created_file = store.put(received.path, received.sha256)
    try:
        if check is not None:
            check()
        if db.get(Blob, sha) is None:
            db.add(Blob(sha256=sha, size_bytes=size))
            db.flush()  # the new row references the blob row
        row = make_row(sha, size)
        db.add(row)
        if before_commit is not None:
            db.flush()
            before_commit(row)
        db.commit()
    except BaseException:
        db.rollback()
        if created_file and not blob_referenced(db, sha):
            store.delete(sha)
        raise
    return row


def blob_referenced(db: Session, sha256: str) -> bool:
    """Whether any model, dataset or artifact still points at the blob."""
    return any(
        db.scalar(select(func.count()).select_from(table).where(table.sha256 == sha256))
        for table in (Model, Dataset, Artifact)
    )


def release_blob(*, db: Session, store: ArtifactStore, sha256: str) -> None:
    """Drop a blob nothing points at any more (row first, file after the commit)."""
    if blob_referenced(db, sha256):
        return
    blob = db.get(Blob, sha256)
    if blob is not None:
        db.delete(blob)
        db.commit()
    store.delete(sha256)
