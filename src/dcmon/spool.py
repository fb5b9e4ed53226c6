"""The durable spool: every line of line protocol lands here (SQLite, WAL) before anything is sent.

Why SQLite: one file, transactions, crash safety and page reuse come with the standard library.

Layout (``PRAGMA application_id`` marks the file as ours, ``user_version`` is the schema version):
- ``queue(id, time_ns, line)``: waiting to be sent, oldest first (by ``id``, the order they were put);
- ``quarantine(id, time_ns, line, reason, at_ns)``: lines InfluxDB refused for good (400), set aside so the
  rest flows; ``dcmon spool quarantine list|retry|clear`` deals with them;
- ``meta(key, value)``: ``dropped_total``, the sender's ``last_error`` (written on state changes only).

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

Bounded size: when the used pages exceed ``max_bytes`` (or the disk holding the spool gets within
``DISK_RESERVE`` of full), the oldest queued lines are dropped down to 95 % of the cap (hysteresis, so it
happens in chunks, not every cycle); lines older than ``max_age_s`` are dropped too. Drops are counted
(``dropped_total``, persisted) and logged as warnings that say how many, at most one line per
``DROP_LOG_INTERVAL_S``. The file never shrinks (freed pages are reused), so it stays near the cap.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import DcmonError

log = logging.getLogger(__name__)

APPLICATION_ID = 0x64636D73  # "dcms": marks a dcmon spool file
SCHEMA_VERSION = 1
DISK_RESERVE = 64 * 1024 * 1024  # keep at least this much free on the spool's filesystem
DROP_LOG_INTERVAL_S = 600.0       # at most one "dropped" warning per this many seconds
PAGE_SIZE = 4096                  # 1024 and 2048 measured worse: more pages per commit, more checkpoints
MAX_DEFERRED_ACKS = 20_000        # deferred deletions are committed at the latest at this many
CHECK_INTERVAL_S = 60.0           # age cap and free-disk checks, at most this often
_CORRUPT = {11, 26}               # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL = 13                        # SQLITE_FULL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, line TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, line TEXT NOT NULL,
                                       reason TEXT NOT NULL, at_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""


class SpoolError(DcmonError):
    """The spool file cannot be used at all (directory not writable, not a spool file)."""


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


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class Spool:
    """A durable FIFO of line-protocol lines. Thread-safe: one connection, one lock; every method is short
    (no network inside), so the poller's ``put`` never waits long on the sender."""

    def __init__(self, path: Path, *, max_bytes: int, max_age_s: float, durability: str,
                 repair: bool, disk_reserve: int = DISK_RESERVE) -> None:
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' or 'power', not {durability!r}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.durability = durability
        self.disk_reserve = disk_reserve
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
             repair: bool = True, create: bool = True, disk_reserve: int = DISK_RESERVE) -> Spool:
        """Open (or create) the spool. ``repair``: move a corrupt or unreadable file aside and start anew
        (the daemon); without it (the ``dcmon spool`` command) such a file raises SpoolError instead.
        ``create=False`` raises FileNotFoundError when there is no spool file yet."""
        self = cls(path, max_bytes=max_bytes, max_age_s=max_age_s, durability=durability, repair=repair,
                   disk_reserve=disk_reserve)
        if not create and not self.path.exists():
            raise FileNotFoundError(str(self.path))
        with self._lock:
            self._connect()
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
            if not _is_corrupt(e):
                raise SpoolError(f"cannot open the spool {p}: {e}; check the disk and the file's permissions") from None
            self._corrupt(str(e))
            try:
                self._db = self._open_db()
            except sqlite3.Error as e2:
                raise SpoolError(f"cannot start a new spool at {p}: {e2}; check the disk, or set spool.path") from None

    def _open_db(self) -> sqlite3.Connection:
        """Connect, check that the file is ours, set the pragmas, create the tables. Raises sqlite3 errors."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
                raise SpoolError(f"{self.path} is an SQLite database but not a dcmon spool; "
                                 f"set spool.path to a file of its own")
            if app_id == 0:  # a new file: the page size is fixed once WAL mode is on
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=" + ("FULL" if self.durability == "power" else "NORMAL"))
            db.execute("PRAGMA journal_size_limit=4194304")  # WAL truncated back to 4 MiB after checkpoints
            # Debian builds SQLite with SECURE_DELETE on: every sent line would be zeroed on disk, and each
            # freed page written once more. Readings are not secrets; SD cards are worth more.
            db.execute("PRAGMA secure_delete=OFF")
            if app_id == 0:
                db.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
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
        dest = p.with_name(f"{p.name}.corrupt-{_utc_stamp()}")
        try:
            os.replace(p, dest)
            for suffix in ("-wal", "-shm"):
                side = p.with_name(p.name + suffix)
                if side.exists():
                    os.replace(side, dest.with_name(dest.name + suffix))
        except OSError as e:
            raise SpoolError(f"spool {p} is unusable ({why}) and cannot be moved aside ({e.strerror}); "
                             f"move or delete it by hand, or set spool.path") from None
        self.moved_aside = dest
        self._depth = 0
        self._pending.clear()
        log.warning("spool %s was unusable (%s): moved it to %s and started an empty spool "
                    "(to salvage readings from it: sqlite3 %s .recover)", p, why, dest, dest)

    def _call(self, fn):  # type: ignore[no-untyped-def]
        """Run fn(db) under the lock; on corruption, move the file aside, reopen and run fn once more."""
        with self._lock:
            if self._db is None:
                raise SpoolError(f"spool {self.path} is closed")
            try:
                return fn(self._db)
            except sqlite3.DatabaseError as e:
                if not _is_corrupt(e):
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
        the same point instead of adding one. Never raises for a storage problem: when the disk is full or
        failing, the lines are counted as lost (``stats().lost_total``) and one warning per change is logged.
        """
        now = time.time_ns()
        rows = []
        for raw in lines:
            for line in raw.splitlines():  # a stray newline would shift the server's line numbers
                line = line.strip()
                if not line:
                    continue
                t = line_time_ns(line)
                if t is None:
                    t = now
                    line = f"{line} {now}"
                rows.append((t, line))
        if not rows:
            return

        def insert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = _delete_ids(db, self._pending)  # deferred acks: first, so the page has room
                db.executemany("INSERT INTO queue (time_ns, line) VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._pending.clear()
            self._depth = max(0, self._depth - gone) + len(rows)

        try:
            self._call(insert)
        except (sqlite3.Error, SpoolError) as e:
            self._lost += len(rows)
            text = f"cannot store readings in the spool {self.path}: {_sqlite_text(e)}"
            if text != self._store_error:
                self._store_error = text
                log.error("%s; %d readings lost so far (free disk space, check the SD card)", text, self._lost)
            return
        if self._store_error:
            log.info("spool %s is writable again", self.path)
            self._store_error = ""
        with contextlib.suppress(sqlite3.Error, SpoolError):
            self._call(self._enforce_caps)

    def _enforce_caps(self, db: sqlite3.Connection) -> None:
        now_m = time.monotonic()
        if now_m >= self._next_check:
            self._next_check = now_m + CHECK_INTERVAL_S
            self._drop_expired(db)
            self._disk_cap = self._disk_limit(db)
        cap = min(self.max_bytes, self._disk_cap) if self._disk_cap is not None else self.max_bytes
        if _used_bytes(db) > cap:
            self._drop_to(db, int(cap * 0.95), "full" if cap == self.max_bytes else "disk nearly full")
        self._log_drops(now_m)

    def _disk_limit(self, db: sqlite3.Connection) -> int | None:
        """The cap the free disk space allows: the file as it is (its free pages are reused without growing
        it) plus what the disk has beyond the reserve. None when that is above max_bytes anyway."""
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return None
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        file_size = db.execute("PRAGMA page_count").fetchone()[0] * page_size
        limit = file_size + max(0, free - self.disk_reserve)
        return limit if limit < self.max_bytes else None

    def _drop_expired(self, db: sqlite3.Connection) -> None:
        """Drop from the front while lines are older than max_age (arrival order ≈ time order)."""
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        self._flush_acks(db)  # sent lines are not "dropped"
        total = 0
        while True:
            rows = db.execute("SELECT id, time_ns FROM queue ORDER BY id LIMIT 5000").fetchall()
            last = None
            for rid, t in rows:
                if t >= cutoff:
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
        """Drop the oldest queued lines (then the oldest quarantined) until the used bytes are ≤ target."""
        self._flush_acks(db)
        for table in ("queue", "quarantine"):
            for _ in range(50):
                used = _used_bytes(db)
                if used <= target:
                    return
                n_rows = _quarantine_count(db) if table == "quarantine" else self._depth
                if n_rows <= 0:
                    break
                want = max(1, int(n_rows * (used - target) / used) + 1)
                last = db.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?",
                                  (min(want, n_rows) - 1,)).fetchone()
                if last is None:
                    if table == "queue":
                        self._depth = 0
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
        return int(v) if v is not None else 0

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
                              last_error=str(last_error), lost_total=self._lost)
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


def _is_corrupt(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT
    text = str(e).lower()
    return "not a database" in text or "malformed" in text


def _sqlite_text(e: Exception) -> str:
    if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == _FULL:
        return "the disk is full"
    return str(e)
