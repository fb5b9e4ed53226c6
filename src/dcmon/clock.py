"""The wall clock, and whether it can be trusted to stamp readings.

A Raspberry Pi has no real-time clock. Until NTP has synchronised it, the wall clock reads the time
fake-hwclock saved last (up to an hour before a power cut, plus the time the Pi was off), or 1970; then it
steps. A reading stamped in that window lands at the wrong time in InfluxDB (on top of readings it already
has, or at 1970 where no dashboard shows it), and an age cap computed from such a clock drops readings that
are minutes old.

So the poller does not stamp readings with the wall clock directly; it asks ``Clock.stamp_ns()``:

- while the clock is **trusted**, that is the wall clock (ns since the epoch);
- while it is **not**, it is the monotonic clock (ns since boot, ``CLOCK_MONOTONIC``): a *provisional* stamp,
  recognisable because it lies before ``floor_ns`` (no real reading can). The spool keeps such readings
  aside (its ``held`` table, on disk like every other reading) and re-stamps them, wall = monotonic +
  (wall − monotonic once the clock is trusted), as soon as it is. The monotonic clock does not step, so the
  re-stamped time is the true time of the reading, to the drift of the crystal (≤ 0.2 s an hour).

Why hold and re-stamp rather than mark and keep: a marked reading would still sit at a wrong time in
InfluxDB (a mark does not move it), and every dashboard query would have to filter on the mark. Re-stamped
readings are simply right. Only readings held across a reboot lose their monotonic base (it restarts at 0);
the spool moves those to its quarantine with the wall time they were taken at, so they are kept and the user
decides (``dcmon spool quarantine list|retry|clear``).

The clock is **not trusted** when any of these holds:

1. it reads a time before ``floor_ns``: before this release was made, or before this module's file was
   written to this disk (install time). 1970 is caught here;
2. it reads a time before the newest reading the spool ever stored (``note_stored``; the spool keeps that
   mark across restarts): after a power cut, fake-hwclock's time is behind. This lasts until the clock steps
   forward past that mark or the system says it is synchronised;
3. the system says it is *not* synchronised (below), for at most ``grace_s`` after boot (600 s). A Pi
   without network never synchronises: after the grace its clock is used as it is, with one warning, so an
   offline Pi still records (it cannot do better without a time source: an RTC or NTP).

Whether the system is synchronised (``system_synced``): ``/run/systemd/timesync/synchronized`` (written by
systemd-timesyncd once it synchronised, this boot), else the kernel's own state through ``adjtimex(2)``
(read-only, via ctypes: Python has no os.adjtimex; ``TIME_ERROR`` = ``STA_UNSYNC``; this works with any NTP
client: timesyncd, chrony, ntpd), else ``timedatectl show -p NTPSynchronized`` (timedated asks the kernel
for us: the installed unit's seccomp filter, ProtectClock=yes, denies adjtimex(2) even read-only). None
when nothing can tell (no systemd, not Linux): then only rules 1 and 2 apply.

A step of the wall clock against the monotonic clock (more than ``STEP_NS``) makes the clock re-check at
once. It is only checked while untrusted otherwise (every ``PROBE_S``): once trusted, a step is what would
change that, and rules 1–2 are checked on every stamp (two comparisons).

Tests shift the clock in the process under test by injecting ``wall_ns`` / ``mono_ns`` / ``synced``
callables (there is no environment switch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

RELEASE_FLOOR_NS = 1_790_000_000 * 10**9  # 2026-09-21: no reading of this release can be older
STEP_NS = 2 * 10**9      # a change of (wall − monotonic) beyond this is a step, not NTP's slewing (≤ 0.5 ms/s)
BEHIND_TOLERANCE_NS = 2 * 10**9  # readings of one cycle are stored out of order by up to a cycle's length
PROBE_S = 5.0            # while untrusted, ask whether the system is synchronised this often
GRACE_S = 600.0          # after boot, wait this long for NTP before using an unsynchronised clock as it is
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
_TIME_ERROR = 5          # adjtimex(2) return value: clock not synchronised


def format_ns(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def boot_id() -> str:
    """This boot's id (monotonic stamps are only comparable within one boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _adjtimex() -> bool | None:
    """The kernel's view through adjtimex(2) with modes = 0 (read-only; no privilege needed, but a seccomp
    filter may deny it: EPERM → None)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.adjtimex
    except (OSError, AttributeError, TypeError):
        return None
    buf = ctypes.create_string_buffer(1024)  # struct timex is ~200 bytes; modes (first field) = 0: read only
    r = fn(buf)
    if r < 0:
        return None
    return r != _TIME_ERROR


def _timedatectl() -> bool | None:
    exe = shutil.which("timedatectl")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True,
                           timeout=3.0)
    except (OSError, subprocess.SubprocessError):
        return None
    value = r.stdout.strip()
    return {"yes": True, "no": False}.get(value) if r.returncode == 0 else None


def system_synced() -> bool | None:
    """True / False when the system knows whether its clock is synchronised, None when it cannot tell."""
    try:
        if TIMESYNCD_FLAG.exists():
            return True
    except OSError:
        pass
    state = _adjtimex()
    return state if state is not None else _timedatectl()


def _floor_ns() -> int:
    try:
        installed = Path(__file__).stat().st_mtime_ns
    except OSError:
        installed = 0
    return max(RELEASE_FLOOR_NS, installed)


class Clock:
    """Stamps for readings, and whether the wall clock is trusted (see the module's doc). Thread-safe."""

    def __init__(self, *, wall_ns: Callable[[], int] = time.time_ns, mono_ns: Callable[[], int] = time.monotonic_ns,
                 synced: Callable[[], bool | None] = system_synced, floor_ns: int | None = None,
                 grace_s: float = GRACE_S, boot: str | None = None) -> None:
        self._wall = wall_ns
        self._mono = mono_ns
        self._synced = synced
        self.floor_ns = _floor_ns() if floor_ns is None else floor_ns
        self.grace_ns = int(grace_s * 1e9)
        self.boot = boot if boot is not None else boot_id()
        self._lock = threading.Lock()
        self._trusted: bool | None = None   # None: not evaluated yet
        self._why = ""
        self._offset: int | None = None     # wall − mono at the last look
        self._newest = 0                    # the newest stamp stored so far (rule 2)
        self._behind = False                # rule 2 seen, not yet cleared by a forward step or a sync
        self._next_probe = 0                # mono ns
        self._grace_logged = False

    # ------------------------------------------------------------------------------------ for the poller

    def stamp_ns(self) -> int:
        """A reading's time: the wall clock when trusted, else a provisional monotonic stamp (< floor_ns)."""
        with self._lock:
            wall, mono = self._wall(), self._mono()
            return wall if self._check(wall, mono) else mono

    def trusted(self) -> bool:
        with self._lock:
            return self._check(self._wall(), self._mono())

    @property
    def why(self) -> str:
        """Why the clock is not trusted ("" when it is)."""
        with self._lock:
            return self._why

    def is_provisional(self, t_ns: int) -> bool:
        return t_ns < self.floor_ns

    def offset_ns(self) -> int:
        """wall − monotonic now: a provisional stamp m is wall time m + offset_ns() once trusted."""
        return self._wall() - self._mono()

    def note_stored(self, t_ns: int) -> None:
        """The spool stored a reading stamped t_ns (wall time): the clock must not read earlier later."""
        if t_ns > self._newest and not self.is_provisional(t_ns):
            with self._lock:
                self._newest = max(self._newest, t_ns)

    @property
    def newest_ns(self) -> int:
        return self._newest

    # ------------------------------------------------------------------------------------ internals

    def _check(self, wall: int, mono: int) -> bool:
        offset = wall - mono
        prev = self._offset
        stepped = prev is not None and abs(offset - prev) > STEP_NS
        if stepped and self._trusted is not None and prev is not None:
            log.info("the system clock stepped by %+.1f s (now %s)", (offset - prev) / 1e9, format_ns(wall))
            self._next_probe = 0
            if offset > prev:  # a forward step may be the correction rule 2 waits for
                self._behind = self._behind and wall < self._newest - BEHIND_TOLERANCE_NS
        self._offset = offset
        if wall < self.floor_ns:
            return self._set(False, f"it reads {format_ns(wall)}, before this dcmon was installed "
                                    f"({format_ns(self.floor_ns)})", wall)
        if self._newest and wall < self._newest - BEHIND_TOLERANCE_NS:
            self._behind = True
        if not self._trusted or stepped or self._behind:
            if mono >= self._next_probe or self._trusted is None:
                self._next_probe = mono + int(PROBE_S * 1e9)
                synced = self._synced()
                if self._behind and synced:
                    self._behind = False  # the system says it is right: the stored readings were ahead
                if self._behind:
                    return self._set(False, f"it reads {format_ns(wall)}, before the newest reading stored "
                                            f"({format_ns(self._newest)}): behind, as after a power cut", wall)
                if synced is False and mono < self.grace_ns:
                    return self._set(False, "the system says it is not synchronised yet (NTP)", wall)
                if synced is False and not self._grace_logged:
                    self._grace_logged = True
                    log.warning("the system clock is still not synchronised %.0f s after boot: stamping readings "
                                "with it as it is (%s); without network, fit an RTC or check NTP: "
                                "timedatectl timesync-status (docs/troubleshooting.md)", self.grace_ns / 1e9,
                                format_ns(wall))
                return self._set(True, "", wall)
            return bool(self._trusted)
        return True

    def _set(self, trusted: bool, why: str, wall: int) -> bool:
        if trusted != self._trusted or (not trusted and why.split(":")[0] != self._why.split(":")[0]):
            if not trusted:
                log.warning("the system clock cannot be trusted yet: %s; readings are kept in the spool with "
                            "their monotonic time and stamped once it can (check NTP: timedatectl "
                            "timesync-status)", why)
            elif self._trusted is False:
                log.info("the system clock can be trusted again (%s): held readings are stamped and sent",
                         format_ns(wall))
        self._trusted, self._why = trusted, why
        return trusted
