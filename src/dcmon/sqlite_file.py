"""Opening an SQLite file that dcmon owns (the spool, the battery state): one way for every such file.

``open_owned`` connects, checks that the file is ours (``PRAGMA application_id``; a new, empty file becomes
ours), fixes the page size on a new file, sets WAL mode and the pragmas, and creates the schema once, in one
transaction. ``move_aside`` puts an unusable file (and its WAL and shared-memory files) beside itself as
``NAME.corrupt-<UTC stamp>``; ``is_corrupt`` tells an unusable file from another failure (a full disk, a
lock, permissions). The callers word their own errors (a spool, a battery state).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

CORRUPT_CODES = {11, 26}   # SQLITE_CORRUPT, SQLITE_NOTADB


class NotOurs(Exception):
    """The file is an SQLite database, but another application's (or an older tool's without our mark)."""


def open_owned(path: Path, *, application_id: int, schema_version: int, schema: Iterable[str],
               page_size: int, synchronous: str = "FULL", pragmas: Iterable[str] = ()) -> tuple[sqlite3.Connection, set[str]]:
    """Connect to ``path`` (created when missing) in autocommit mode, usable from any thread under the
    caller's lock. Returns the connection and the tables the file had before (empty: it was new). Raises
    NotOurs, or the sqlite3 error (``is_corrupt`` tells whether moving it aside would help)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id not in (0, application_id) or (app_id == 0 and tables):
            raise NotOurs(f"{path} is an SQLite database, but not dcmon's")
        if app_id == 0:   # a new file: the page size is fixed once WAL mode is on
            db.execute(f"PRAGMA page_size={int(page_size)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        # Debian builds SQLite with SECURE_DELETE on: every deleted row would be zeroed on disk, and each
        # freed page written once more. Readings are not secrets; SD cards are worth more.
        db.execute("PRAGMA secure_delete=OFF")
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}")
        if app_id == 0:
            db.execute("BEGIN IMMEDIATE")
            for stmt in schema:
                db.execute(stmt)
            db.execute(f"PRAGMA application_id={int(application_id)}")
            db.execute(f"PRAGMA user_version={int(schema_version)}")
            db.execute("COMMIT")
    except BaseException:
        db.close()
        raise
    return db, tables


def is_corrupt(e: sqlite3.Error) -> bool:
    """The file itself is unusable (corrupt, or not a database): moving it aside is the remedy."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in CORRUPT_CODES
    text = str(e).lower()
    return "not a database" in text or "malformed" in text


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(path: Path) -> Path:
    """Rename ``path`` (and its -wal/-shm files) to ``NAME.corrupt-<stamp>``; returns the new name. OSError
    when it cannot (the caller says what to do)."""
    dest = path.with_name(f"{path.name}.corrupt-{utc_stamp()}")
    os.replace(path, dest)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, dest.with_name(dest.name + suffix))
    return dest


__all__ = ["CORRUPT_CODES", "NotOurs", "is_corrupt", "move_aside", "open_owned", "utc_stamp"]
