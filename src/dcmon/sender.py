"""The sender: drains the spool into InfluxDB, oldest first, deleting a batch only once the server took it.

What it does with each answer (see dcmon.influx for the classification):
- success                → ack (delete) the batch;
- SinkPermanent (400)    → quarantine the lines the server named (InfluxDB 2.x: "line N"; 1.x quotes the
                           bad line: "unable to parse '...'"), re-send the rest; when the server does not say
                           which, split the batch in halves until the bad lines are alone. Re-sending lines a
                           1.x "partial write" already stored is harmless: same series + timestamp overwrite;
- SinkTooLarge (413)     → split the batch and send smaller batches; after each success the batch size
                           doubles again, up to ``batch_lines``; for 10 min after a 413 only up to the
                           largest batch taken since (a server with a lower limit costs a 413 per 10 min);
- SinkAuth (401/403/404) → keep everything, retry with back-off (the user may fix it while we run);
- SinkRetryable          → keep everything, back off exponentially (1 s doubling, capped at 60 s),
                           or as long as the server's Retry-After says (capped at 10 min). When the server
                           could not be reached at all (refused, timed out), it is probed with a cheap
                           ``GET /ping`` every ``PROBE_INTERVAL_S`` meanwhile: the backlog starts draining
                           within seconds of the server's return, not up to a minute later.
It logs one line per state change (down, back up, backlog drained) and one per batch that had lines
quarantined (with the count), never one per line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import SinkAuth, SinkError, SinkPermanent, SinkRetryable, SinkTooLarge
from .influx import redact_url
from .spool import Spool

log = logging.getLogger(__name__)

ACK_DEFER_S = 5.0           # acks ride on the next put's commit; when idle, committed after this long
IDLE_TICK_S = 5.0           # look at the spool this often even without a poke (e.g. after `quarantine retry`)
STOP_SLICE_S = 1.0          # how promptly run() notices its stop event without a poke (wake-ups cost CPU on a Pi Zero)
MAX_RETRY_AFTER_S = 600.0   # a server asking for a longer pause than this is not believed
PROBE_INTERVAL_S = 2.0      # while backing off from an unreachable server, GET /ping this often
REFUSED_MEMORY_S = 600.0    # after a 413, do not grow back to the refused batch size for this long
_QUOTED = re.compile(r"unable to parse '(.+?)': ")


class Sink(Protocol):
    """What the sender writes to: an InfluxSink, or one wrapped (influx_setup's backfill watches writes)."""

    where: str

    def write(self, lines: list[str]) -> None: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


class Sender:
    """Drains a Spool into an InfluxSink. ``run`` is the thread body; ``flush`` may be called from another
    thread (sends are serialised by a lock)."""

    def __init__(self, spool: Spool, sink: Sink | None, *, batch_lines: int = 5000,
                 min_backoff_s: float = 1.0, max_backoff_s: float = 60.0, min_send_interval_s: float = 0.0,
                 on_backlog_sent: Callable[[float], None] | None = None) -> None:
        """``min_send_interval_s``: with no backlog, send at most this often (pokes in between only mark
        work). 0 = on every poke. Fewer HTTP requests (CPU) against more rows waiting in the spool between
        sends (bench/README.md, Spool, has what each costs in SD-card writes)."""
        self.spool = spool
        self.sink = sink
        self.on_backlog_sent = on_backlog_sent  # called with the outage's length (s) once its backlog is sent
        self.batch_lines = max(1, int(batch_lines))
        self.max_batch_lines = self.batch_lines  # what the config asks; 413s lower batch_lines for a while
        self._refused: tuple[int, float] | None = None  # (size refused with 413, until monotonic)
        self._good = 0              # the largest batch taken since the last 413
        self._probe = False         # backing off from an unreachable server: probe it with /ping
        self._next_probe = 0.0
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.min_send_interval_s = max(0.0, min_send_interval_s)
        self._hold_until = 0.0      # monotonic: min_send_interval_s after the last partial batch
        self.sent_points = 0
        self.send_failures = 0
        self.last_error = ""
        self.last_progress = time.monotonic()  # the thread is alive and not stuck (for the watchdog)
        self._wake = threading.Event()
        self._send_lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0        # monotonic: no attempt before this (back-off)
        self._state_key: tuple[object, ...] | None = None  # the failing condition we last logged; None = ok
        self._outage_started = 0.0
        self._draining = False      # a backlog is being sent after an outage
        self._drain_sent = 0
        self._where = sink.where if sink is not None else "InfluxDB"
        self._prefetched: list[tuple[int, str]] | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------------ public

    def poke(self) -> None:
        """New lines were spooled: send now rather than at the next tick (back-off still applies)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Thread body: drain, wait, repeat until ``stop`` is set. Never raises: a failing spool or server
        is logged (once per change) and retried later."""
        if self.sink is None:
            log.info("InfluxDB is disabled in the config: readings stay in the spool %s", self.spool.path)
        while not stop.is_set():
            self.last_progress = time.monotonic()
            wait = IDLE_TICK_S
            if self.sink is not None and time.monotonic() >= self._not_before():
                try:
                    if self._drain_some(deadline=None, stop=stop):
                        continue  # more queued: go on at once
                except Exception as e:  # noqa: BLE001 - the thread must outlive a failing server or disk
                    log.debug("send failed", exc_info=not isinstance(e, SinkError))
                    self._failed(e)
            if self.sink is not None and self._probe and self._retry_at > time.monotonic():
                self._maybe_probe()
                if self._retry_at <= time.monotonic():
                    continue  # it is back: send now
            if self._not_before() > time.monotonic():
                wait = min(wait, self._not_before() - time.monotonic()) if self.sink is not None else wait
                if self._probe:
                    wait = min(wait, max(0.05, self._next_probe - time.monotonic()))
            if self._retry_at <= time.monotonic():
                self._commit_idle_acks()
            self._sleep(wait, stop)

    def send_once(self) -> bool:
        """Send one batch now, as run() does on each wake-up. True if a full batch went (more may wait).
        Raises the sink's error when the batch could not be delivered."""
        return self._drain_some(deadline=None, stop=None)

    def flush(self, timeout_s: float) -> bool:
        """Send everything queued now, trying until ``timeout_s`` has passed (plus at most one request's
        timeout). True if the spool is empty afterwards. Used at shutdown and by ``run --once``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self.sink is None:
            return self._empty()
        try:
            return self._flush(deadline)
        finally:
            try:
                self.spool.flush_acks()
            except Exception as e:  # noqa: BLE001 - flush reports, it does not raise
                log.warning("cannot record sent readings in the spool (%s); they will be sent again, "
                            "which is harmless", e)

    def _flush(self, deadline: float) -> bool:
        while True:
            try:
                if not self._drain_some(deadline=deadline, stop=None) and self._empty():
                    return True
            except Exception as e:  # noqa: BLE001 - flush reports, it does not raise
                self._failed(e)
                pause = max(0.2, min(1.0, self._retry_at - time.monotonic()))
                if time.monotonic() + pause >= deadline:
                    return self._empty()
                time.sleep(pause)
            if time.monotonic() >= deadline:
                return self._empty()

    def _empty(self) -> bool:
        try:
            return not self.spool.peek(1)
        except Exception:  # noqa: BLE001 - an unreadable spool is not an empty one
            return False

    # ------------------------------------------------------------------------------------ internals

    def _not_before(self) -> float:
        return max(self._retry_at, self._hold_until)

    def _maybe_probe(self) -> None:
        """During a back-off from an unreachable server: is it back? Then send at once."""
        assert self.sink is not None
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_INTERVAL_S
        try:
            up = self.sink.ping()
        except Exception:  # noqa: BLE001 - a probe is only a hint
            up = False
        if up:
            log.debug("%s answers /ping again: retrying now instead of in %.0f s", self._where,
                      self._retry_at - now)
            self._retry_at = now
            self._probe = False

    def _commit_idle_acks(self) -> None:
        try:
            self.spool.flush_acks(older_than_s=ACK_DEFER_S)
        except Exception as e:  # noqa: BLE001 - logged by _failed, retried on the next tick
            self._failed(e)

    def _sleep(self, seconds: float, stop: threading.Event) -> None:
        """Wait for a poke, the stop event, or the time, whichever comes first. During a back-off a poke
        does not shorten the wait: it only marks that there is work."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            self.last_progress = time.monotonic()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._wake.wait(min(left, STOP_SLICE_S)):
                if time.monotonic() >= self._not_before():
                    self._wake.clear()
                    return
                time.sleep(min(STOP_SLICE_S, max(0.0, self._not_before() - time.monotonic())))

    def _drain_some(self, *, deadline: float | None, stop: threading.Event | None) -> bool:
        """Send one batch. True if a full batch went (there may be more). Raises the sink's error when the
        batch could not be delivered (it stays queued)."""
        with self._send_lock:
            self._wake.clear()
            rows, self._prefetched = self._prefetched or self.spool.peek(self.batch_lines), None
            if not rows:
                self._finish_drain()
                return False
            full = len(rows) >= self.batch_lines
            ahead: Future[list[tuple[int, str]]] | None = None
            if full:  # a backlog: read the next batch (and commit the acks so far) while this one is in flight
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-prefetch")
                ahead = self._pool.submit(self._read_ahead, rows[-1][0])
            try:
                self._send_rows(rows)
            finally:
                nxt = _result(ahead)
            self._succeeded(len(rows))
            go_on = full and not (stop is not None and stop.is_set()) and \
                (deadline is None or time.monotonic() < deadline)
            if go_on:
                self._prefetched = nxt
            if not full:
                self._finish_drain()
                self._hold_until = time.monotonic() + self.min_send_interval_s
            return go_on

    def _read_ahead(self, after: int) -> list[tuple[int, str]]:
        self.spool.flush_acks()
        return self.spool.peek(self.batch_lines, after=after)

    def _send_rows(self, rows: list[tuple[int, str]]) -> None:
        """Deliver rows, acking what the server took and quarantining what it refused for good. Parts are
        handled in order (a stack of halves), so the oldest lines still go first."""
        assert self.sink is not None
        stack = [rows]
        refused: list[tuple[int, str]] = []   # quarantined in this batch: logged once, at the end
        reasons: list[SinkError] = []
        try:
            while stack:
                part = stack.pop()
                if len(part) > self.batch_lines:  # a half left over from before a 413: the smaller size
                    n = self.batch_lines
                    stack += [part[i:i + n] for i in range(0, len(part), n)][::-1]
                    continue
                try:
                    self.sink.write([line for _, line in part])
                except SinkPermanent as e:
                    bad = self._bad_indexes(e, part)
                    if bad:
                        refused += self._quarantine([part[i] for i in sorted(bad)], e, reasons)
                        rest = [r for i, r in enumerate(part) if i not in bad]
                        if rest:
                            stack.append(rest)
                    elif len(part) == 1:
                        refused += self._quarantine(part, e, reasons)
                    else:
                        mid = len(part) // 2
                        stack += [part[mid:], part[:mid]]
                    continue
                except SinkTooLarge as e:
                    if len(part) == 1:
                        refused += self._quarantine(part, e, reasons)
                        continue
                    mid = len(part) // 2
                    now = time.monotonic()
                    self._refused = (len(part), now + REFUSED_MEMORY_S)
                    self._good = 0
                    if mid < self.batch_lines:
                        log.info("%s: batch of %d lines too large (413); sending at most %d lines per batch "
                                 "(growing back after successes)", self._where, len(part), mid)
                        self.batch_lines = mid
                    stack += [part[mid:], part[:mid]]
                    continue
                self.spool.ack([rid for rid, _ in part], defer=True)
                self.sent_points += len(part)
                self._drain_sent += len(part)
                self._good = max(self._good, len(part))
                self._grow_batch()
        finally:
            if refused:
                self._log_refused(refused, len(rows), reasons)

    def _grow_batch(self) -> None:
        """After a success: double the batch size, up to the configured one; for REFUSED_MEMORY_S after a 413
        only up to the largest batch the server took since (so a lower server limit costs one 413 then)."""
        if self.batch_lines >= self.max_batch_lines:
            return
        limit = self.max_batch_lines
        if self._refused is not None:
            if time.monotonic() < self._refused[1]:
                limit = min(limit, max(self._good, self.batch_lines))
            else:
                self._refused = None
        new = min(limit, self.batch_lines * 2)
        if new > self.batch_lines:
            self.batch_lines = new
            if new == self.max_batch_lines:
                log.info("%s: batches of %d lines again", self._where, new)

    @staticmethod
    def _bad_indexes(e: SinkPermanent, part: list[tuple[int, str]]) -> set[int]:
        """Which lines the server named: by number (2.x), or by quoting them (1.x; matched only when exactly
        one line fits, as the message may be cut short)."""
        bad = {i for i in e.bad_lines if 0 <= i < len(part)}
        if bad:
            return bad
        text = str(e)
        for quoted in _QUOTED.findall(text):
            hits = [i for i, (_, line) in enumerate(part) if " ".join(line.split()) == quoted]
            if len(hits) == 1:
                bad.add(hits[0])
        return bad

    def _quarantine(self, rows: list[tuple[int, str]], e: SinkError, reasons: list[SinkError]) -> list[tuple[int, str]]:
        self.spool.quarantine([rid for rid, _ in rows], str(e))
        reasons.append(e)
        return rows

    def _log_refused(self, rows: list[tuple[int, str]], batch: int, reasons: list[SinkError]) -> None:
        """One line per batch: how many were quarantined, why (the first reason), one example."""
        try:
            total = self.spool.stats().quarantined
        except Exception:  # noqa: BLE001 - the count is for the message only
            total = -1
        e = reasons[0]
        why = " ".join(str(e).split())
        why = why if len(why) <= 200 else why[:197] + "..."
        sample = rows[0][1]
        sample = sample if len(sample) <= 120 else sample[:117] + "..."
        log.warning("%s refused %d of %d line(s) in a batch for good (%s: %s); set aside in the quarantine "
                    "(%d in all), e.g. %r; see `dcmon spool quarantine list`", self._where, len(rows), batch,
                    e.status if e.status else type(e).__name__, why, total, sample)

    def _succeeded(self, n: int) -> None:
        if self._state_key is not None:
            depth = self.spool.stats().depth
            log.info("%s reachable again; sending %d queued readings", self._where, depth + n)
            self._state_key = None
            self._draining = True
            self.spool.set_last_error("")
            self.last_error = ""
        self._backoff = 0.0
        self._retry_at = 0.0

    def _finish_drain(self) -> None:
        if self._draining:
            log.info("%s: backlog sent (%d readings in %.0f s after the outage began)", self._where,
                     self._drain_sent, time.monotonic() - self._outage_started)
            self._draining = False
            if self.on_backlog_sent is not None:
                self.on_backlog_sent(time.monotonic() - self._outage_started)

    def _failed(self, e: BaseException) -> None:
        """Count, back off, and log when the failing condition changed."""
        self.send_failures += 1
        self._backoff = min(self.max_backoff_s, max(self.min_backoff_s, self._backoff * 2))
        wait = self._backoff
        retry_after = getattr(e, "retry_after", None)
        if isinstance(e, SinkRetryable) and retry_after is not None:
            wait = min(MAX_RETRY_AFTER_S, max(retry_after, 0.0))
        self._retry_at = time.monotonic() + wait
        # unreachable (no HTTP answer at all): probe cheaply meanwhile; a server that answered (5xx, 429,
        # 401) is up, and a probe would only say so, so the back-off stands
        self._probe = isinstance(e, SinkRetryable) and e.status is None and e.retry_after is None
        self._next_probe = time.monotonic() + min(PROBE_INTERVAL_S, wait)
        if isinstance(e, SinkError):
            text = str(e)
            key: tuple[object, ...] = (type(e).__name__, e.status, text if e.status is None else "")
        else:
            text = redact_url(f"sending failed: {type(e).__name__}: {e}")
            key = (type(e).__name__, text)
        self.last_error = text
        if key != self._state_key:
            if self._state_key is None:
                self._outage_started = time.monotonic()
                self._drain_sent = 0
            self._state_key = key
            self.spool.set_last_error(text)
            try:
                depth = self.spool.stats().depth
            except Exception:  # noqa: BLE001 - the spool itself may be what failed
                depth = -1
            queued = f"{depth} queued" if depth >= 0 else "spool unreadable"
            how = "keeping readings in the spool" if isinstance(e, SinkError) else "will retry"
            (log.error if isinstance(e, SinkAuth) else log.warning)("%s; %s (%s)", text, how, queued)


def _result(fut: Future[list[tuple[int, str]]] | None) -> list[tuple[int, str]] | None:
    """The read-ahead's rows, or None (then the next round simply reads them itself)."""
    if fut is None:
        return None
    try:
        return fut.result() or None
    except Exception:  # noqa: BLE001 - an optimisation only: a failing spool shows up on the next peek
        return None
