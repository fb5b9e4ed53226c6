"""The durable spool: every line of line protocol lands here (SQLite, WAL) before anything is sent.

Why SQLite: one file, transactions, crash safety and page reuse come with the standard library.

Layout (``PRAGMA application_id`` marks the file as ours, ``user_version`` is the schema version):
- ``queue(id, time_ns, line)``: waiting to be sent, oldest first (by ``id``, the order they were put);
- ``quarantine(id, time_ns, line, reason, at_ns)``: lines InfluxDB refused for good (400), set aside so the
  rest flows; ``dcmon spool quarantine list|retry|clear`` deals with them;
- ``held(id, mono_ns, boot, line)``: readings taken while the system clock could not be trusted
  (dcmon.clock), with their monotonic time and boot id; re-stamped (wall = monotonic + the trusted offset)
  and moved to ``queue`` once it can. Rows of an earlier boot (their monotonic base is gone) are moved to
  the quarantine at open, with the wall time they were taken at and a reason that says so;
- ``meta(key, value)``: ``dropped_total``, ``newest_time_ns`` (the newest stamp stored, written at most once a
  minute: a clock reading earlier after a restart is behind), the sender's ``last_error`` (state changes only).

Durability (``spool.durability``):
- ``process`` (default): WAL + ``synchronous=NORMAL``. A commit is in the WAL file (the OS cache) before
  ``put`` returns, so it survives the process being killed (SIGKILL, OOM, systemd), not a power cut.
  The disk is synced only at checkpoints: the fewest writes, the kindest to SD cards.
- ``power``: WAL + ``synchronous=FULL``. Every commit is fsync'ed: survives a power cut, at the cost of one
  (or two, with the sender's ack) synchronous flushes per poll cycle, which SD cards feel as latency and wear.
  bench/README.md has the measured bytes per reading for both.

Commits: one per poll cycle. ``put`` writes the cycle's lines in one transaction, and the sender's acks
(deletions of sent lines) ride on the next ``put``'s transaction instead of one of their own (see ``ack``).
At 8 meters × 1 Hz with InfluxDB up that is one commit and about one 4 KiB WAL page per cycle.

Bounded size, WAL included: the WAL is checkpointed into the file every ``WAL_PAGES`` pages (1 MiB;
less for a small cap) and truncated back to that size (``journal_size_limit``), so the WAL is bounded too,
and the cap counts it: used pages + WAL file ≤ ``max_bytes``. Before each put the spool also checks the free
space of its filesystem (one statvfs): the database may grow only into what is free beyond the disk reserve
(``DISK_RESERVE``), the WAL's headroom and the reserve file. When a put would go over
either, the oldest lines are dropped first, down to 95 % (hysteresis, so it happens in chunks, not every
cycle), so that the new lines fit. Lines older than ``max_age_s`` are dropped too, but only while the clock
is trusted and never those held for the clock. Drops are counted exactly (``dropped_total``, persisted) and
logged as warnings that say how many, at most one line per ``DROP_LOG_INTERVAL_S``. The file never shrinks
(freed pages are reused), so it stays near the cap.

A full disk all the same (another program filled it): SQLite can then neither insert nor delete, as both
write to the WAL. The spool keeps a reserve file beside it (``<path>-reserve``, ``RESERVE_BYTES``) for that
moment: on SQLITE_FULL it deletes the reserve, drops the oldest lines, checkpoints, and stores the new lines;
the reserve is made again once the disk has room. So deletions always succeed and the newest readings are
kept; only when even that fails are lines counted as lost (``lost_total``).

Corruption: a file that SQLite cannot read (not a database, malformed) is renamed to
``<path>.corrupt-<UTC time>`` (with its -wal/-shm), one warning says where it went and how to salvage it
(``sqlite3 FILE .recover``), and a new spool is started. This is checked at open and on every operation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .errors import SpoolError
from .sqlite_file import NotOurs, is_corrupt, move_aside, open_owned

T = TypeVar("T")

if TYPE_CHECKING:
    from .clock import Clock

log = logging.getLogger(__name__)

APPLICATION_ID = 0x64636D73  # "dcms": marks a dcmon spool file
SCHEMA_VERSION = 1
DISK_RESERVE = 64 * 1024 * 1024  # keep at least this much free on the spool's filesystem
DROP_LOG_INTERVAL_S = 600.0       # at most one "dropped" warning per this many seconds
PAGE_SIZE = 4096                  # 1024 and 2048 measured worse: more pages per commit, more checkpoints
MAX_DEFERRED_ACKS = 20_000        # deferred deletions are committed at the latest at this many
CHECK_INTERVAL_S = 60.0           # age cap and reserve-file checks, at most this often
WAL_PAGES = 256                   # checkpoint (and truncate the WAL to) this many pages: 1 MiB
RESERVE_BYTES = 2 * 1024 * 1024   # the reserve file that lets deletions succeed on a full disk
RELEASE_CHUNK = 5000              # held lines re-stamped per transaction
MARK_INTERVAL_S = 60.0            # newest_time_ns is written to meta at most this often
_FULL = 13                        # SQLITE_FULL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, line TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, line TEXT NOT NULL,
                                       reason TEXT NOT NULL, at_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
# Added after schema 1 (created on open when missing: no migration needed, older versions ignore it)
_HELD = "CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY, mono_ns INTEGER NOT NULL, boot TEXT NOT NULL, line TEXT NOT NULL)"


@dataclass(frozen=True, slots=True)
class SpoolStats:
    depth: int                # lines queued
    bytes: int                # bytes of used pages (what the cap counts)
    file_bytes: int           # database + WAL files on disk
    oldest_time_ns: int | None  # timestamp of the oldest queued line
    dropped_total: int        # dropped by the cap since the spool file was created
    quarantined: int          # lines in the quarantine
    last_error: str           # the sender's last error ("" if none), with its UTC time
    lost_total: int = 0       # lines that could not be stored at all (disk full, I/O error) since open
    held: int = 0             # lines waiting for a trusted clock (not sent yet, see dcmon.clock)


@dataclass(frozen=True, slots=True)
class QuarantinedLine:
    id: int
    time_ns: int
    line: str
    reason: str
    at_ns: int


def line_time_ns(line: str) -> int | None:
    """The timestamp of a line of line protocol: its last token, when that is an integer."""
    tail = line.rsplit(" ", 1)[-1]
    if tail.lstrip("-").isdigit() and " " in line:
        return int(tail)
    return None


def _restamp(line: str, t_ns: int) -> str:
    return f"{line.rsplit(' ', 1)[0]} {t_ns}"


class Spool:
    """A durable FIFO of line-protocol lines. Thread-safe: one connection, one lock; every method is short
    (no network inside), so the poller's ``put`` never waits long on the sender."""

    def __init__(self, path: Path, *, max_bytes: int, max_age_s: float, durability: str,
                 repair: bool, disk_reserve: int = DISK_RESERVE, clock: Clock | None = None,
                 wal_pages: int = WAL_PAGES) -> None:
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' or 'power', not {durability!r}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.durability = durability
        self.disk_reserve = disk_reserve
        self.clock = clock          # None: lines are stored with the stamps they have (tools, benchmarks)
        # a small cap gets a smaller WAL: the WAL is counted against the cap
        self.wal_pages = max(16, min(int(wal_pages), self.max_bytes // 8 // PAGE_SIZE))
        self._reserve = self.path.with_name(self.path.name + "-reserve")
        self._held = 0
        self._next_mark = 0.0
        self._repair = repair
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._depth = 0                 # rows in the queue table (including acked-but-not-yet-deleted)
        self._pending: list[int] = []   # acked ids whose deletion rides on the next commit (see ack)
        self._pending_since = 0.0
        self._lost = 0
        self._pending_drop = 0          # dropped but not yet logged
        self._drop_why = ""
        self._last_drop_log = -1e18     # monotonic time of the last "dropped" warning
        self._next_check = 0.0          # monotonic time of the next age / free-disk check
        self._disk_cap: int | None = None  # cap lowered because the disk is nearly full
        self._store_error = ""          # put() cannot store: logged once per change
        self.moved_aside: Path | None = None  # where a corrupt file went, if it did

    # ------------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, *, max_bytes: int, max_age_s: float, durability: str = "process",
             repair: bool = True, create: bool = True, disk_reserve: int = DISK_RESERVE,
             clock: Clock | None = None, wal_pages: int = WAL_PAGES) -> Spool:
        """Open (or create) the spool. ``repair``: move a corrupt or unreadable file aside and start anew
        (the daemon); without it (the ``dcmon spool`` command) such a file raises SpoolError instead.
        ``create=False`` raises FileNotFoundError when there is no spool file yet. ``clock`` (the daemon's):
        hold readings while it cannot be trusted, re-stamp them once it can (dcmon.clock)."""
        self = cls(path, max_bytes=max_bytes, max_age_s=max_age_s, durability=durability, repair=repair,
                   disk_reserve=disk_reserve, clock=clock, wal_pages=wal_pages)
        if not create and not self.path.exists():
            raise FileNotFoundError(str(self.path))
        with self._lock:
            self._connect()
            if clock is not None:
                self._call(self._adopt_held)
            self._make_reserve()
        return self

    def _connect(self) -> None:
        p = self.path
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create the spool folder {p.parent}: {e.strerror}; create it and make it "
                             f"writable by the user that runs dcmon, or set spool.path") from None
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise SpoolError(f"spool folder {p.parent} is not writable by this user; "
                             f"`chown` it to the user that runs dcmon, or set spool.path")
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            self._corrupt("cannot be read or written by this user (permission denied)")
        try:
            self._db = self._open_db()
        except sqlite3.DatabaseError as e:
            if not is_corrupt(e):
                raise SpoolError(f"cannot open the spool {p}: {e}; check the disk and the file's permissions") from None
            self._corrupt(str(e))
            try:
                self._db = self._open_db()
            except sqlite3.Error as e2:
                raise SpoolError(f"cannot start a new spool at {p}: {e2}; check the disk, or set spool.path") from None

    def _open_db(self) -> sqlite3.Connection:
        """Connect, check that the file is ours, set the pragmas, create the tables. Raises sqlite3 errors."""
        try:
            # the WAL is checkpointed at wal_pages and truncated back to that size: bounded, and its space
            # is reused from the start after each checkpoint (so deletions need no new disk space)
            db, tables = open_owned(
                self.path, application_id=APPLICATION_ID, schema_version=SCHEMA_VERSION,
                schema=[st for st in _SCHEMA.strip().split(";") if st.strip()], page_size=PAGE_SIZE,
                synchronous="FULL" if self.durability == "power" else "NORMAL",
                pragmas=(f"wal_autocheckpoint={self.wal_pages}", f"journal_size_limit={self.wal_pages * PAGE_SIZE}"))
        except NotOurs:
            raise SpoolError(f"{self.path} is an SQLite database but not a dcmon spool; "
                             f"set spool.path to a file of its own") from None
        try:
            if "held" not in tables:
                db.execute(_HELD)
            self._held = db.execute("SELECT count(*) FROM held").fetchone()[0]
            # max − min + 1: instant even for a million rows (count(*) would read them all at start-up);
            # exact but for quarantine gaps, and resynchronised whenever the sender reads the whole queue
            lo, hi = db.execute("SELECT min(id), max(id) FROM queue").fetchone()
            self._depth = 0 if lo is None else hi - lo + 1
        except BaseException:
            db.close()
            raise
        return db

    def _corrupt(self, why: str) -> None:
        """Move the file (and its WAL) aside, log where it went. Without ``repair``: raise instead."""
        p = self.path
        if not self._repair:
            raise SpoolError(f"spool {p} is unusable ({why}); `dcmon run` moves it aside and starts a new one, "
                             f"or inspect it with: sqlite3 {p} .recover")
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        try:
            dest = move_aside(p)
        except OSError as e:
            raise SpoolError(f"spool {p} is unusable ({why}) and cannot be moved aside ({e.strerror}); "
                             f"move or delete it by hand, or set spool.path") from None
        self.moved_aside = dest
        self._depth = 0
        self._pending.clear()
        log.warning("spool %s was unusable (%s): moved it to %s and started an empty spool "
                    "(to salvage readings from it: sqlite3 %s .recover)", p, why, dest, dest)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(db) under the lock; on corruption, move the file aside, reopen and run fn once more."""
        with self._lock:
            if self._db is None:
                raise SpoolError(f"spool {self.path} is closed")
            try:
                return fn(self._db)
            except sqlite3.DatabaseError as e:
                if not is_corrupt(e):
                    raise
                self._rollback()
                self._corrupt(str(e))
                self._db = self._open_db()
                return fn(self._db)

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error, SpoolError):
                    self.flush_acks()
                self._db.close()  # the last connection to close checkpoints the WAL into the file
                self._db = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ writing

    def put(self, lines: Sequence[str]) -> None:
        """Store one poll cycle's lines in one transaction (one commit: fewer SD-card writes).

        A line without a timestamp gets the current time appended, so a re-send after a crash overwrites
        the same point instead of adding one. With a clock: while it cannot be trusted, the lines go to
        ``held`` with their monotonic time; once it can, provisional stamps are turned into wall time and
        the held lines are re-stamped and queued. Never raises for a storage problem: when the disk is full
        or failing, the oldest lines are dropped to make room; lines that still cannot be stored are
        counted as lost (``stats().lost_total``) and one warning per change is logged.
        """
        clock = self.clock
        trusted = clock is None or clock.trusted()
        now = time.time_ns() if clock is None else clock.stamp_ns()
        offset = 0 if clock is None else clock.offset_ns()
        rows: list[tuple[int, str]] = []
        held: list[tuple[int, str, str]] = []
        for raw in lines:
            for line in raw.splitlines():  # a stray newline would shift the server's line numbers
                line = line.strip()
                if not line:
                    continue
                t = line_time_ns(line)
                if t is None:
                    t = now
                    line = f"{line} {now}"
                if clock is not None:
                    provisional = clock.is_provisional(t)
                    if not trusted:  # keep the monotonic time; the line carries the wall clock's guess
                        mono = t if provisional else t - offset
                        held.append((mono, clock.boot, _restamp(line, mono + offset) if provisional else line))
                        continue
                    if provisional:  # stamped before the clock became trusted
                        t += offset
                        line = _restamp(line, t)
                rows.append((t, line))
        if not rows and not held:
            return
        if clock is not None and self._held and trusted:
            self._store_guarded(self._release_held, 0, 0)
        need = sum(len(line) + 40 for _, line in rows) + sum(len(line) + 80 for *_, line in held)

        def insert(db: sqlite3.Connection) -> None:
            now_m = time.monotonic()
            mark = max((t for t, _ in rows), default=0)
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = _delete_ids(db, self._pending)  # deferred acks: first, so the page has room
                if rows:
                    db.executemany("INSERT INTO queue (time_ns, line) VALUES (?, ?)", rows)
                if held:
                    db.executemany("INSERT INTO held (mono_ns, boot, line) VALUES (?, ?, ?)", held)
                if clock is not None and mark and now_m >= self._next_mark:
                    db.execute("INSERT INTO meta (key, value) VALUES ('newest_time_ns', ?) ON CONFLICT(key) "
                               "DO UPDATE SET value = max(value, excluded.value)", (mark,))
                    self._next_mark = now_m + MARK_INTERVAL_S
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._pending.clear()
            self._depth = max(0, self._depth - gone) + len(rows)
            self._held += len(held)
            if clock is not None and mark:
                clock.note_stored(mark)

        if not self._store_guarded(insert, need, len(rows) + len(held)):
            return
        if self._store_error:
            log.info("spool %s is writable again", self.path)
            self._store_error = ""
        with contextlib.suppress(sqlite3.Error, SpoolError):
            self._call(lambda db: self._enforce_caps(db, 0))

    def _store_guarded(self, fn, need: int, n_lines: int) -> bool:  # type: ignore[no-untyped-def]
        """Run a writing fn(db) after making room for ``need`` bytes. On SQLITE_FULL: give up the reserve
        file, drop the oldest lines, checkpoint, and try once more. False (and one error per change) when
        it still cannot be stored."""
        err: Exception | None = None
        for attempt in range(2):
            try:
                if need:
                    self._call(lambda db: self._enforce_caps(db, need))
                self._call(fn)
                return True
            except (sqlite3.Error, SpoolError) as e:
                err = e
                if attempt or not _is_full(e):
                    break
                self._rollback()
                try:
                    self._call(self._recover_full)
                except (sqlite3.Error, SpoolError) as e2:
                    err = e2
                    break
        assert err is not None
        self._lost += n_lines
        text = f"cannot store readings in the spool {self.path}: {_sqlite_text(err)}"
        if text != self._store_error:
            self._store_error = text
            log.error("%s; %d readings lost so far (free disk space, check the SD card)", text, self._lost)
        return False

    def _recover_full(self, db: sqlite3.Connection) -> None:
        """The disk is full: free the reserve, drop 10 % of the oldest lines, checkpoint the WAL."""
        released = self._release_reserve()
        used = _used_bytes(db)
        self._drop_to(db, int(used * 0.90), "disk full")
        self._checkpoint(db)
        log.warning("spool %s: the disk is full%s; dropped the oldest readings to keep the newest (%d dropped "
                    "in all); free disk space", self.path, " (used the spool's reserve file)" if released else "",
                    self._meta_int("dropped_total"))

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the WAL into the file and truncate it (after drops: the freed pages are then reusable in
        place, and the WAL's space is returned to the disk)."""
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def _enforce_caps(self, db: sqlite3.Connection, need: int) -> None:
        """Before a put of ``need`` bytes (0: after one): drop the oldest lines when the spool (pages in use +
        WAL) would exceed max_bytes, or the database would grow beyond what the disk can spare."""
        now_m = time.monotonic()
        if not need and now_m >= self._next_check:  # after the put (the age cap needs the put's lines)
            self._next_check = now_m + CHECK_INTERVAL_S
            if self.clock is None or self.clock.trusted():
                self._drop_expired(db)
            self._make_reserve()
        used, wal = _used_bytes(db), self._wal_bytes()
        cap_total = self.max_bytes - wal  # the WAL counts against the cap
        disk = self._disk_limit(db, wal)
        cap = cap_total if disk is None else min(cap_total, disk)
        if used + need > cap:
            why = "full" if disk is None or cap_total <= disk else "disk nearly full"
            self._drop_to(db, max(0, int(cap * 0.95) - need), why)
            if why != "full":
                self._checkpoint(db)
        self._log_drops(now_m)

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self.path.with_name(self.path.name + "-wal")).st_size
        except OSError:
            return 0

    def _disk_limit(self, db: sqlite3.Connection, wal: int) -> int | None:
        """How far the pages in use may go given the free disk space: the database file as it is (its free
        pages are reused without growing it) plus what the disk has beyond the reserve, the WAL's headroom
        (up to its bound) and the reserve file when it is missing. None when that is above max_bytes anyway."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize
        reserve = self.disk_reserve
        try:
            file_size = os.stat(self.path).st_size
        except OSError:
            return None
        headroom = max(0, self.wal_pages * PAGE_SIZE - wal)
        missing = 0 if self._reserve.exists() else self._reserve_size()
        limit = file_size + max(0, free - reserve - headroom - missing)
        return limit if limit < self.max_bytes else None

    # ---- the reserve file

    def _reserve_size(self) -> int:
        return min(RESERVE_BYTES, max(self.wal_pages * PAGE_SIZE, self.max_bytes // 16))

    def _make_reserve(self) -> None:
        if self._reserve.exists():
            return
        size = self._reserve_size()
        try:
            if shutil.disk_usage(self.path.parent).free < 2 * size:
                return
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # real blocks, not a sparse file
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
            return True
        except OSError:
            return False

    # ---- the clock's held lines

    def _adopt_held(self, db: sqlite3.Connection) -> None:
        """At open: tell the clock the newest stamp stored; move held lines of an earlier boot (their
        monotonic time means nothing now) to the quarantine, stamped with the wall time they were taken at."""
        assert self.clock is not None
        last = db.execute("SELECT time_ns FROM queue ORDER BY id DESC LIMIT 1").fetchone()
        mark = db.execute("SELECT value FROM meta WHERE key = 'newest_time_ns'").fetchone()
        for t in (last[0] if last else 0, int(mark[0]) if mark else 0):
            self.clock.note_stored(t)
        if not self._held:
            return
        reason = ("taken while the system clock was not set, before a reboot: the time it had then is kept "
                  "(maybe wrong); `dcmon spool quarantine retry` sends them as they are")
        now = time.time_ns()
        old = db.execute("SELECT line FROM held WHERE boot != ? ORDER BY id", (self.clock.boot,)).fetchall()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO quarantine (time_ns, line, reason, at_ns) VALUES (?, ?, ?, ?)",
                           [(line_time_ns(line) or 0, line, reason, now) for (line,) in old])
            n = len(old)
            db.execute("DELETE FROM held WHERE boot != ?", (self.clock.boot,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._held = db.execute("SELECT count(*) FROM held").fetchone()[0]
        if n:
            log.warning("spool %s: %d readings were taken before a reboot while the system clock was not set; "
                        "their true time is unknown: kept in the quarantine (`dcmon spool quarantine list`)",
                        self.path, n)

    def _release_held(self, db: sqlite3.Connection) -> None:
        """The clock is trusted: re-stamp held lines (wall = monotonic + offset) and queue them, in chunks."""
        assert self.clock is not None
        offset, boot, total = self.clock.offset_ns(), self.clock.boot, 0
        while True:
            chunk = db.execute("SELECT id, mono_ns, line FROM held WHERE boot = ? ORDER BY id LIMIT ?",
                               (boot, RELEASE_CHUNK)).fetchall()
            if not chunk:
                break
            rows = [(m + offset, _restamp(line, m + offset)) for _, m, line in chunk]
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO queue (time_ns, line) VALUES (?, ?)", rows)
                db.execute("DELETE FROM held WHERE boot = ? AND id <= ?", (boot, chunk[-1][0]))
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth += len(rows)
            total += len(rows)
            self.clock.note_stored(max(t for t, _ in rows))
        self._held = db.execute("SELECT count(*) FROM held").fetchone()[0]
        if total:
            log.info("spool %s: %d readings taken while the clock was not trusted are stamped with their true "
                     "time (monotonic clock + the trusted offset) and queued", self.path, total)

    def _drop_expired(self, db: sqlite3.Connection) -> None:
        """Drop from the front while lines are older than max_age (arrival order ≈ time order). Lines stamped
        before the clock's floor are not old but wrongly stamped (an older version's 1970): not dropped."""
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        floor = self.clock.floor_ns if self.clock is not None else 0
        self._flush_acks(db)  # sent lines are not "dropped"
        total = 0
        while True:
            rows = db.execute("SELECT id, time_ns FROM queue ORDER BY id LIMIT 5000").fetchall()
            last = None
            for rid, t in rows:
                if t >= cutoff or t < floor:
                    break
                last = rid
            if last is None:
                break
            n = self._delete_front(db, "queue", last)
            total += n
            if last != rows[-1][0]:
                break
        if total:
            self._note_dropped(db, total, f"older than {self.max_age_s / 86400:g} days")

    def _drop_to(self, db: sqlite3.Connection, target: int, why: str) -> None:
        """Drop the oldest queued lines (then held, then quarantined) until the used bytes are ≤ target."""
        self._flush_acks(db)
        for table in ("queue", "held", "quarantine"):
            for _ in range(50):
                used = _used_bytes(db)
                if used <= target:
                    return
                n_rows = {"quarantine": _quarantine_count(db), "held": self._held}.get(table, self._depth)
                if n_rows <= 0:
                    break
                want = max(1, int(n_rows * (used - target) / used) + 1)
                last = db.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?",
                                  (min(want, n_rows) - 1,)).fetchone()
                if last is None:
                    if table == "queue":
                        self._depth = 0
                    elif table == "held":
                        self._held = 0
                    break
                n = self._delete_front(db, table, last[0])
                self._note_dropped(db, n, f"spool {why}: over {self.max_bytes / 1048576:g} MiB"
                                   if why == "full" else f"spool {why}")

    def _delete_front(self, db: sqlite3.Connection, table: str, last_id: int) -> int:
        db.execute("BEGIN IMMEDIATE")
        try:
            n = db.execute(f"DELETE FROM {table} WHERE id <= ?", (last_id,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if table == "queue":
            self._depth = max(0, self._depth - n)
        elif table == "held":
            self._held = max(0, self._held - n)
        return n

    def _note_dropped(self, db: sqlite3.Connection, n: int, why: str) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES ('dropped_total', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (n,))
        self._pending_drop += n
        self._drop_why = why

    def _log_drops(self, now_m: float) -> None:
        if self._pending_drop and now_m - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            log.warning("spool %s: dropped the %d oldest readings (%s); %d dropped in all "
                        "(raise spool.max_bytes / spool.max_age_days, or bring InfluxDB back)",
                        self.path, self._pending_drop, self._drop_why, self._meta_int("dropped_total"))
            self._pending_drop = 0
            self._last_drop_log = now_m

    # ------------------------------------------------------------------------------------ reading / acking

    def _floor(self) -> int:
        """Rows up to this id are acked (deletion deferred): peek and stats skip them."""
        return max(self._pending) if self._pending else -1

    def peek(self, limit: int, *, after: int = -1) -> list[tuple[int, str]]:
        """Up to ``limit`` of the oldest queued lines (with an id above ``after``), as (id, line). Nothing is
        removed until ``ack``."""
        def q(db: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = db.execute("SELECT id, line FROM queue WHERE id > ? ORDER BY id LIMIT ?",
                              (max(after, self._floor()), limit)).fetchall()
            if len(rows) < limit and after < 0:  # the whole queue was read: resynchronise the counter
                self._depth = len(rows) + len(self._pending)
            return rows
        return self._call(q)

    def ack(self, ids: Sequence[int], *, defer: bool = False) -> None:
        """The server has these lines: delete them.

        ``defer`` (the sender's steady state): the deletion is committed with the next ``put`` (or by
        ``flush_acks``), not in a commit of its own. At 8 meters × 1 Hz that halves the commits, the WAL
        pages written and, with durability "power", the fsyncs. A crash before that commit re-sends those
        lines: harmless, a point with the same series and timestamp overwrites itself. Acks must come in
        queue order (oldest first), as the sender's do: peek skips everything up to the highest deferred id.
        """
        if not ids:
            return
        with self._lock:
            if defer:
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending.extend(ids)
                if len(self._pending) < MAX_DEFERRED_ACKS:
                    return
                ids = []
            self._call(lambda db: self._commit_deletes(db, list(ids)))

    def flush_acks(self, older_than_s: float = 0.0) -> None:
        """Commit deferred acks now (if they have waited at least ``older_than_s``)."""
        with self._lock:
            if self._pending and time.monotonic() - self._pending_since >= older_than_s:
                self._call(lambda db: self._commit_deletes(db, []))

    def _flush_acks(self, db: sqlite3.Connection) -> None:
        if self._pending:
            self._commit_deletes(db, [])

    def _commit_deletes(self, db: sqlite3.Connection, ids: list[int]) -> None:
        """Delete ``ids`` and the deferred acks in one transaction."""
        db.execute("BEGIN IMMEDIATE")
        try:
            n = _delete_ids(db, self._pending) + _delete_ids(db, ids)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._pending.clear()
        self._depth = max(0, self._depth - n)

    def quarantine(self, ids: Sequence[int], reason: str) -> int:
        """Move these queued lines to the quarantine (one transaction). Returns how many moved."""
        if not ids:
            return 0
        now = time.time_ns()

        def mv(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for i in ids:
                    cur = db.execute("INSERT INTO quarantine (time_ns, line, reason, at_ns) "
                                     "SELECT time_ns, line, ?, ? FROM queue WHERE id = ?", (reason[:500], now, i))
                    if cur.rowcount:
                        db.execute("DELETE FROM queue WHERE id = ?", (i,))
                        n += 1
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth = max(0, self._depth - n)
            return n
        return self._call(mv)

    def quarantine_list(self, limit: int | None = None) -> list[QuarantinedLine]:
        return self._call(lambda db: [QuarantinedLine(*r) for r in db.execute(
            "SELECT id, time_ns, line, reason, at_ns FROM quarantine ORDER BY id LIMIT ?",
            (-1 if limit is None else limit,))])

    def quarantine_retry(self) -> int:
        """Put every quarantined line back at the end of the queue (after fixing the cause)."""
        def mv(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                n = db.execute("INSERT INTO queue (time_ns, line) SELECT time_ns, line FROM quarantine "
                               "ORDER BY id").rowcount
                db.execute("DELETE FROM quarantine")
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth += n
            return n
        return self._call(mv)

    def quarantine_clear(self) -> int:
        def rm(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM quarantine").rowcount
        return self._call(rm)

    def iter_lines(self, *, quarantine: bool = False, chunk: int = 10_000) -> Iterator[str]:
        """Every queued (or quarantined) line, oldest first, read in chunks (safe for millions)."""
        table = "quarantine" if quarantine else "queue"
        after = -1
        while True:
            rows = self._call(lambda db: db.execute(
                f"SELECT id, line FROM {table} WHERE id > ? ORDER BY id LIMIT ?", (after, chunk)).fetchall())
            if not rows:
                return
            for _, line in rows:
                yield line
            after = rows[-1][0]

    # ------------------------------------------------------------------ energy counters (the poller's)
    # Each sensor's last energy counter, kept here so that a counter that went down while the poller was
    # stopped (`dcmon reset-energy` between stop and start) is flagged energy_reset like one that went down
    # while it ran. A table of its own, made on first use, so spools from before it need no migration.

    _COUNTERS = "CREATE TABLE IF NOT EXISTS counters (sensor TEXT PRIMARY KEY, energy_wh REAL NOT NULL) WITHOUT ROWID"

    def load_counters(self) -> dict[str, float]:
        """{sensor name: last energy counter in Wh} as last saved."""
        def q(db: sqlite3.Connection) -> dict[str, float]:
            db.execute(self._COUNTERS)
            return {name: float(v) for name, v in db.execute("SELECT sensor, energy_wh FROM counters")}
        try:
            return self._call(q)
        except sqlite3.Error as e:
            raise SpoolError(f"cannot read the energy counters from {self.path}: {_sqlite_text(e)}") from None

    def save_counters(self, counters: Mapping[str, float]) -> None:
        """Store the counters (one small transaction; sensors not named keep their saved value)."""
        if not counters:
            return
        def w(db: sqlite3.Connection) -> None:
            db.execute(self._COUNTERS)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO counters (sensor, energy_wh) VALUES (?, ?) ON CONFLICT(sensor) "
                               "DO UPDATE SET energy_wh = excluded.energy_wh", list(counters.items()))
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        try:
            self._call(w)
        except sqlite3.Error as e:
            raise SpoolError(f"cannot store the energy counters in {self.path}: {_sqlite_text(e)}") from None

    # ------------------------------------------------------------------------------------ status

    def set_last_error(self, text: str) -> None:
        """The sender's error, for ``dcmon spool status`` (called on state changes, not per batch)."""
        stamped = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC: {text}" if text else ""
        with contextlib.suppress(sqlite3.Error, SpoolError):
            self._call(lambda db: db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_error', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (stamped,)))

    def _meta(self, key: str) -> object:
        r = self._call(lambda db: db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone())
        return r[0] if r else None

    def _meta_int(self, key: str) -> int:
        v = self._meta(key)
        return int(str(v)) if v is not None else 0

    def count(self) -> int:
        """The exact queue depth (a full count; ``stats().depth`` is a maintained counter)."""
        with self._lock:
            n = self._call(lambda db: db.execute("SELECT count(*) FROM queue").fetchone()[0])
            self._depth = n
            return max(0, n - len(self._pending))

    def stats(self) -> SpoolStats:
        def s(db: sqlite3.Connection) -> SpoolStats:
            oldest = db.execute("SELECT time_ns FROM queue WHERE id > ? ORDER BY id LIMIT 1",
                                (self._floor(),)).fetchone()
            if oldest is None:
                self._depth = len(self._pending)
            quarantined = _quarantine_count(db)
            last_error = self._meta("last_error") or ""
            if self._store_error:
                last_error = self._store_error
            return SpoolStats(depth=max(0, self._depth - len(self._pending)), bytes=_used_bytes(db), file_bytes=self.file_bytes(),
                              oldest_time_ns=oldest[0] if oldest else None,
                              dropped_total=self._meta_int("dropped_total"), quarantined=quarantined,
                              last_error=str(last_error), lost_total=self._lost, held=self._held)
        return self._call(s)

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path.with_name(self.path.name + suffix)).st_size
        return total

    def pragma(self, name: str) -> object:
        """One PRAGMA's value (tests and the benchmark check the durability settings with it)."""
        row = self._call(lambda db: db.execute(f"PRAGMA {name}").fetchone())
        return row[0] if row else None


def _used_bytes(db: sqlite3.Connection) -> int:
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * page_size


def _delete_ids(db: sqlite3.Connection, ids: Sequence[int]) -> int:
    if not ids:
        return 0
    lo, hi = min(ids), max(ids)
    if hi - lo + 1 == len(set(ids)):  # contiguous, the usual case: one range delete
        return db.execute("DELETE FROM queue WHERE id BETWEEN ? AND ?", (lo, hi)).rowcount
    return sum(db.execute("DELETE FROM queue WHERE id = ?", (i,)).rowcount for i in ids)


def _quarantine_count(db: sqlite3.Connection) -> int:
    """Quarantine ids are always contiguous (rows are appended, and removed from the front or all at
    once), so max − min + 1 is the count, without reading every row as count(*) would."""
    lo, hi = db.execute("SELECT min(id), max(id) FROM quarantine").fetchone()
    return 0 if lo is None else hi - lo + 1


def _is_full(e: Exception) -> bool:
    if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == _FULL:
        return True
    return "database or disk is full" in str(e)


def _sqlite_text(e: Exception) -> str:
    if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == _FULL:
        return "the disk is full"
    return str(e)
