"""A tiny systemd client with no dependency: readiness, status and a watchdog tied to real progress.

The service runs as ``Type=notify`` with ``WatchdogSec=60`` (deploy/dcmon.service). systemd then expects:

- ``READY=1`` once the poller is really working (config loaded, spool open, threads started);
- ``WATCHDOG=1`` at least once per ``WatchdogSec``, otherwise it kills and restarts the service.

A timer thread that pings regardless would defeat the watchdog: a hung serial read or a wedged sender
would go unnoticed for years. So the ping here is earned: every loop that was registered must report
progress between two pings, or no ping is sent and systemd restarts us. How the poller uses it::

    wd = Watchdog.from_env()            # disabled (every call a no-op) when not run by systemd
    wd.register("poll:rs485")           # one name per loop, before ready()
    wd.register("send")
    wd.ready("polling 2 sensors on 1 bus")
    ...
    # in each loop, once per turn (a turn that waits must wake at least every wd.interval_s / 2):
    wd.progress("poll:rs485")
    # in one supervising place (main thread), every second or so:
    wd.maybe_ping()
    ...
    wd.stopping()

Outside systemd (``NOTIFY_SOCKET`` unset) nothing is sent and nothing fails. A send that fails
(socket gone) returns False and is never raised: telling systemd is best effort, polling is not.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping

__all__ = ["JournalFormatter", "Watchdog", "notify", "under_journal", "watchdog_interval"]


def _address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` → a socket address. ``@name`` is a Linux abstract socket (leading NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify datagram, e.g. ``"READY=1\\nSTATUS=polling"``.

    Returns True when it was sent, False when not under systemd or the send failed. ``env`` defaults to
    ``os.environ`` (tests pass their own). Only filesystem and abstract AF_UNIX sockets are supported
    (systemd also allows ``vsock:`` addresses for VMs; they are ignored here).
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path or path.startswith("vsock:") or not path.startswith(("/", "@")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), _address(path))
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period in seconds that systemd asked for, or None when there is none for us.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``: when that names another process, the
    watchdog is not ours, e.g. a child that inherited the environment).
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000


def _clean(text: str) -> str:
    """STATUS is one line: a newline would start a new (bogus) assignment."""
    return " ".join(text.split())


class Watchdog:
    """Pings systemd's watchdog only while every registered loop keeps making progress.

    ``interval_s`` is systemd's watchdog period (``Watchdog.from_env()`` reads it), or None to disable
    the watchdog; ``ready``/``status``/``stopping`` still work then. A ping is sent at most once every
    ``interval_s / 4`` so that datagrams stay rare while a hung loop is still caught well within the
    period. Thread-safe: loops call ``progress`` from their own threads.
    """

    def __init__(self, interval_s: float | None, *, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s if interval_s and interval_s > 0 else None
        self._env = env
        self._clock = clock
        self._lock = threading.Lock()
        self._loops: dict[str, bool] = {}  # name → progressed since the last ping
        self._last_ping: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, loops: Iterable[str] = ()) -> Watchdog:
        """A watchdog with systemd's period from ``WATCHDOG_USEC``, and ``loops`` already registered."""
        wd = cls(watchdog_interval(env), env=env)
        for name in loops:
            wd.register(name)
        return wd

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    @property
    def min_gap_s(self) -> float:
        """Pings are at least this far apart (0 when disabled)."""
        return self.interval_s / 4 if self.interval_s else 0.0

    def register(self, name: str) -> None:
        """Watch a loop from now on: no ping until it reports progress. Register every loop before
        ``ready()``; a loop that never starts must not go unnoticed."""
        with self._lock:
            self._loops.setdefault(name, False)

    def forget(self, name: str) -> None:
        """Stop watching a loop that ended on purpose (e.g. a bus taken out of service)."""
        with self._lock:
            self._loops.pop(name, None)

    def progress(self, name: str) -> None:
        """Record that loop ``name`` completed a turn (a poll cycle, a send attempt, an idle wait).
        An unregistered name is registered by this call."""
        with self._lock:
            self._loops[name] = True

    def stalled(self) -> list[str]:
        """The loops that have not made progress since the last ping (for a status line or a log)."""
        with self._lock:
            return sorted(name for name, moved in self._loops.items() if not moved)

    def maybe_ping(self) -> bool:
        """Send ``WATCHDOG=1`` if the watchdog is on, every registered loop progressed since the last
        ping, and the last ping is at least ``min_gap_s`` old. Returns True when a ping was sent.
        Call it often (every second or so) from one place; calling too often costs nothing."""
        if not self.enabled:
            return False
        now = self._clock()
        with self._lock:
            if not self._loops or not all(self._loops.values()):
                return False
            if self._last_ping is not None and now - self._last_ping < self.min_gap_s:
                return False
            for name in self._loops:
                self._loops[name] = False
            self._last_ping = now
        return notify("WATCHDOG=1", env=self._env)

    def ready(self, status: str = "") -> bool:
        """Tell systemd that start-up is done (``READY=1``), with an optional one-line STATUS."""
        return notify("READY=1" + (f"\nSTATUS={_clean(status)}" if status else ""), env=self._env)

    def status(self, text: str) -> bool:
        """Set the one-line status that ``systemctl status dcmon`` shows."""
        return notify(f"STATUS={_clean(text)}", env=self._env)

    def stopping(self, status: str = "") -> bool:
        """Tell systemd that a clean shutdown has begun (``STOPPING=1``)."""
        return notify("STOPPING=1" + (f"\nSTATUS={_clean(status)}" if status else ""), env=self._env)


# ------------------------------------------------------------------------------------------- journald

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def under_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when stderr goes to journald (systemd sets ``JOURNAL_STREAM`` for such services)."""
    return bool((os.environ if env is None else env).get("JOURNAL_STREAM"))


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info,
    ``<7>`` debug), which journald turns into the entry's level, so ``journalctl -u dcmon -p warning``
    shows only what needs a person. No timestamp: journald adds its own."""

    def __init__(self, fmt: str = "%(name)s: %(message)s") -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])
