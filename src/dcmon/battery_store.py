"""The batteries' durable state: one small SQLite file (WAL), written with the spool's care.

- One row per battery (``state(battery, saved_ns, data)``, ``data`` = the monitor's ``to_state()`` as JSON).
- ``save()`` writes every battery given in ONE transaction: the poller calls it once per save interval
  (``SAVE_INTERVAL_S``, and at once after a synchronisation or a loss), not once per reading.
- ``synchronous=FULL``: each commit is on the disk before ``save`` returns, so the state survives a power
  cut as well as ``kill -9``. That is one fsync per interval (30 s), which an SD card does not feel. What
  happened after the last commit is not lost either: the meters' energy counters bridge the gap from the
  saved counter values on the first readings after the restart (see dcmon.battery).
- WAL: a crash in the middle of a commit leaves the previous state, never a torn one.
- A file that is not ours, or that SQLite cannot read, is moved aside (``<path>.corrupt-<UTC time>``)
  with one warning, and a new one is started: the state of charge is then unknown until the next full
  charge, the history starts again. Nothing here ever raises into the poller except BatteryStoreError at
  open (folder not writable), which names the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BatteryStoreError
from .sqlite_file import NotOurs, is_corrupt, move_aside, open_owned

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

APPLICATION_ID = 0x64636D62  # "dcmb": marks a dcmon battery-state file
SCHEMA_VERSION = 1
SAVE_INTERVAL_S = 30.0
STORE_NAME = "battery.sqlite"  # in the spool's folder
PAGE_SIZE = 1024             # one battery's row is about 1 KiB: small pages, small WAL frames

_SCHEMA = ("CREATE TABLE IF NOT EXISTS state (battery TEXT PRIMARY KEY, saved_ns INTEGER NOT NULL, "
           "data TEXT NOT NULL) WITHOUT ROWID")


def store_path(cfg: Config) -> Path:
    """Where the batteries' state is kept: ``battery.sqlite`` in the spool's folder."""
    return cfg.resolve(cfg.spool.path).with_name(STORE_NAME)


class BatteryStore:
    """Thread-safe (one connection, one lock). Use ``BatteryStore.open(path)``; ``close()`` when done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._error = ""
        self.moved_aside: Path | None = None
        self.commits = 0

    @classmethod
    def open(cls, path: Path) -> BatteryStore:
        self = cls(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BatteryStoreError(f"cannot create the folder {self.path.parent} for the battery state: "
                                    f"{e.strerror}; create it, writable by the user that runs dcmon") from None
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise BatteryStoreError(f"folder {self.path.parent} is not writable by this user: the battery state "
                                    f"cannot be kept; `chown` it to the user that runs dcmon")
        with self._lock:
            try:
                self._db = self._connect()
            except NotOurs as e:
                self._move_aside(str(e))
                self._db = self._connect()
            except sqlite3.DatabaseError as e:
                if not is_corrupt(e):
                    raise BatteryStoreError(f"cannot open the battery state {self.path}: {e}; check the disk and "
                                            f"the file's permissions") from None
                self._move_aside(str(e))
                self._db = self._connect()
        return self

    def _connect(self) -> sqlite3.Connection:
        db, _tables = open_owned(self.path, application_id=APPLICATION_ID, schema_version=SCHEMA_VERSION,
                                 schema=[_SCHEMA], page_size=PAGE_SIZE, synchronous="FULL")
        try:
            db.execute("SELECT count(*) FROM state").fetchone()  # reads a page: a corrupt file shows here
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, why: str) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        try:
            dest = move_aside(self.path)
        except OSError as e:
            raise BatteryStoreError(f"battery state {self.path} is unusable ({why}) and cannot be moved aside "
                                    f"({e.strerror}); move or delete it by hand") from None
        self.moved_aside = dest
        log.warning("battery state %s was unusable (%s): moved it to %s and started anew; the state of charge "
                    "is unknown until the next full charge", self.path, why, dest)

    # ---------------------------------------------------------------------------------- use
    def load(self, battery: str) -> dict[str, Any] | None:
        """The saved state of one battery, or None (never saved, or unreadable)."""
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT data FROM state WHERE battery = ?", (battery,)).fetchone()
            except sqlite3.Error as e:
                self._warn(f"cannot read the battery state {self.path}: {e}")
                return None
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def save(self, states: Mapping[str, Mapping[str, Any]]) -> bool:
        """Write the states of these batteries in one transaction. False (and one warning per change of
        problem) when the disk refuses: the poller goes on, the previous state stays in the file."""
        if not states:
            return True
        rows = [(name, int(st.get("saved_ns") or 0), json.dumps(st, separators=(",", ":")))
                for name, st in states.items()]
        with self._lock:
            if self._db is None:
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO state (battery, saved_ns, data) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                self._warn(f"cannot save the battery state in {self.path}: {e} (free disk space, check the SD card)")
                return False
            self.commits += 1
        if self._error:
            log.info("battery state %s is writable again", self.path)
            self._error = ""
        return True

    def _warn(self, text: str) -> None:
        if text != self._error:
            self._error = text
            log.error("%s", text)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def __enter__(self) -> BatteryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SaveSchedule:
    """When to save: every ``interval_s`` on a monotonic deadline, and at once when a monitor says
    something worth keeping happened (``changed``: a synchronisation, a loss)."""

    def __init__(self, interval_s: float = SAVE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next: float | None = None

    def due(self, mono_s: float, changed: bool = False) -> bool:
        if changed or self._next is None or mono_s >= self._next:
            self._next = mono_s + self.interval_s
            return True
        return False


__all__ = ["BatteryStore", "BatteryStoreError", "SaveSchedule", "SAVE_INTERVAL_S", "STORE_NAME", "store_path"]
