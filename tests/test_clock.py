"""The Pi's clock (issue 19, item 1): no reading stored at a time known to be wrong, none lost to the clock.

How the clock is shifted: by injection, inside the process under test. ``dcmon.clock.Clock`` takes the
wall clock, the monotonic clock and the "is the system synchronised" answer as callables; these tests pass
a ``FakeTime`` whose wall clock they set (1970, 25 minutes behind, then the NTP step) while its monotonic
clock runs on. There is no environment switch. Everything else is real: the spool's SQLite file, the
poller reading the simulator on a pty, the sender writing into the real influxd, whose stored timestamps
are checked.
"""

from __future__ import annotations

import logging
import time

import pytest

from dcmon import config
from dcmon.clock import Clock
from dcmon.config import InfluxConfig
from dcmon.outputs.influx import InfluxSink
from dcmon.poller import Poller
from dcmon.reading import encode_line
from dcmon.sender import Sender
from dcmon.spool import Spool

S = 10**9
TRUE_T0 = 1_800_000_000 * S          # 2027-01-15: "now" for these tests
FLOOR = 1_790_000_000 * S            # the clock's floor (before it: known wrong)
FAKE_1970 = 42 * S                   # a Pi without RTC or fake-hwclock, just booted


class FakeTime:
    """The true time runs on (monotonic = since boot); the wall clock = true time + error, set by the test."""

    def __init__(self, boot_mono: int = 30 * S, t0: int = TRUE_T0) -> None:
        self.t0 = t0                # the true time at boot
        self.mono = boot_mono
        self.error = 0              # wall − true
        self.synced: bool | None = None

    def wall(self) -> int:
        return self.t0 + self.mono + self.error

    def true(self, mono: int | None = None) -> int:
        return self.t0 + (self.mono if mono is None else mono)

    def tick(self, seconds: float) -> None:
        self.mono += int(seconds * S)

    def clock(self, **kw) -> Clock:
        return Clock(wall_ns=self.wall, mono_ns=lambda: self.mono, synced=lambda: self.synced,
                     floor_ns=FLOOR, boot=kw.pop("boot", "boot-1"), **kw)


def line(seq: int, t: int | None = None) -> str:
    """A reading; without ``t`` a line without a timestamp (the spool stamps it)."""
    text = encode_line("dc_power", {"sensor": "m1"}, {"voltage_v": 12.5, "seq": seq}, 0 if t is None else t)
    return text.rsplit(" ", 1)[0] if t is None else text


def open_spool(tmp_path, clock, **kw) -> Spool:
    return Spool.open(tmp_path / "spool.sqlite", max_bytes=64 << 20, max_age_s=kw.pop("max_age_s", 365 * 86400),
                      clock=clock, **kw)


def stamps(sp: Spool) -> list[int]:
    return [int(x.rsplit(" ", 1)[1]) for x in sp.iter_lines()]


# ------------------------------------------------------------------------------------ the clock alone

def test_1970_gives_provisional_stamps_then_true_time_after_the_step(caplog):
    ft = FakeTime()
    ft.error = FAKE_1970 - ft.wall()           # the wall clock reads 1970
    c = ft.clock()
    caplog.set_level(logging.INFO, logger="dcmon.clock")
    s1 = c.stamp_ns()
    assert not c.trusted() and c.is_provisional(s1) and s1 == ft.mono
    assert "before this dcmon was installed" in c.why
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    ft.tick(10)
    ft.error = 0                                 # NTP steps the clock to the true time
    ft.synced = True
    assert c.trusted()
    assert s1 + c.offset_ns() == ft.true(30 * S)  # the provisional stamp maps to its true time
    assert c.stamp_ns() == ft.true()
    assert any("stepped by" in r.getMessage() for r in caplog.records)


def test_unsynchronised_clock_is_held_for_the_grace_then_used_as_it_is(caplog):
    ft = FakeTime(boot_mono=20 * S)
    ft.synced = False
    c = ft.clock(grace_s=60)
    caplog.set_level(logging.WARNING, logger="dcmon.clock")
    assert not c.trusted() and "not synchronised" in c.why
    ft.tick(30)
    assert not c.trusted()
    ft.tick(31)                                  # 81 s after boot: past the grace, still no NTP (offline Pi)
    assert c.trusted() and c.stamp_ns() == ft.wall()
    assert any("still not synchronised" in r.getMessage() for r in caplog.records)


def test_behind_the_newest_stored_reading_is_not_trusted_until_it_steps_forward():
    ft = FakeTime()
    c = ft.clock()
    c.note_stored(ft.true() + 25 * 60 * S)       # the spool already holds a reading 25 min "ahead"
    ft.synced = False
    assert not c.trusted() and "before the newest reading stored" in c.why
    ft.tick(3600)                                # an hour later the wall clock has passed that mark,
    assert not c.trusted()                       # but it is still 25 min behind: not trusted
    ft.error = 25 * 60 * S                       # the NTP step forward
    assert c.trusted()


def test_synchronised_system_is_believed_over_the_stored_mark():
    ft = FakeTime()
    ft.synced = True
    c = ft.clock()
    c.note_stored(ft.true() + 600 * S)           # readings stored by a clock that was ahead
    assert c.trusted()


# ------------------------------------------------------------------------------------ with the spool

def test_1970_with_influxdb_down_nothing_dropped_by_age_and_restamped(tmp_path, caplog):
    """The issue's case: 1970, InfluxDB down until after the sync, a 365-day age cap. Before: all readings
    dropped as 'older than 365 days'. Now: held, then stamped with their true times, none dropped."""
    ft = FakeTime()
    ft.error = FAKE_1970 - ft.wall()
    c = ft.clock()
    sp = open_spool(tmp_path, c)
    taken = []
    for i in range(43):
        taken.append(ft.mono)
        sp.put([line(i, c.stamp_ns())])          # what the poller does: stamp, then put
        sp.put([line(1000 + i)])                 # a line without a timestamp (the health lines' way)
        ft.tick(5)
    st = sp.stats()
    assert st.held == 86 and st.depth == 0 and st.dropped_total == 0
    ft.error = 0
    ft.synced = True                             # NTP syncs; the age check runs on the next put
    sp._next_check = 0.0
    caplog.set_level(logging.INFO, logger="dcmon.spool")
    sp.put([line(99, c.stamp_ns())])
    st = sp.stats()
    assert st.held == 0 and st.dropped_total == 0 and st.depth == 87
    got = dict(zip((int(x.split("seq=")[1].split("i")[0]) for x in sp.iter_lines()), stamps(sp)))
    for i, m in enumerate(taken):
        assert got[i] == ft.true(m), "re-stamped with the true time of the reading"
        assert got[1000 + i] == ft.true(m)
    assert all(FLOOR < t <= ft.true() for t in got.values())
    assert any("stamped with their true time" in r.getMessage() for r in caplog.records)
    sp.close()


def test_restart_in_the_same_boot_keeps_held_readings_restampable(tmp_path):
    ft = FakeTime()
    ft.error = FAKE_1970 - ft.wall()
    sp = open_spool(tmp_path, ft.clock())
    m0 = ft.mono
    sp.put([line(1, ft.mono)])
    sp.close()                                   # dcmon restarted (same boot: same monotonic base)
    ft.tick(20)
    c = ft.clock()
    sp = open_spool(tmp_path, c)
    assert sp.stats().held == 1
    ft.error, ft.synced = 0, True
    sp.put([line(2, c.stamp_ns())])
    assert stamps(sp) == [ft.true(m0), ft.true()]
    sp.close()


def test_held_across_a_reboot_goes_to_the_quarantine_not_lost(tmp_path, caplog):
    ft = FakeTime()
    ft.error = FAKE_1970 - ft.wall()
    sp = open_spool(tmp_path, ft.clock(boot="boot-1"))
    sp.put([line(i, ft.mono + i) for i in range(5)])
    sp.close()
    caplog.set_level(logging.WARNING, logger="dcmon.spool")
    ft.error, ft.synced = 0, True
    sp = open_spool(tmp_path, ft.clock(boot="boot-2"))   # after a reboot: the monotonic base is gone
    st = sp.stats()
    assert st.held == 0 and st.quarantined == 5 and st.depth == 0
    assert "before a reboot" in sp.quarantine_list()[0].reason
    assert any("before a reboot" in r.getMessage() for r in caplog.records)
    sp.close()


def test_behind_after_power_cut_no_reading_lands_in_the_window_influx_holds(tmp_path, influxd, fresh_db):
    """The issue's case: before the reboot, readings up to T went to InfluxDB. After a power cut the clock
    is 25 minutes behind (fake-hwclock) until NTP. No reading may be stored inside the window InfluxDB
    already holds; after the sync every reading is at its true time."""
    sink = InfluxSink(InfluxConfig(url=influxd.url, database=fresh_db, timeout_s=5))
    ft = FakeTime()
    ft.synced = True
    sp = open_spool(tmp_path, ft.clock(boot="boot-1"))
    sender = Sender(sp, sink)
    before = []
    for i in range(20):
        before.append(ft.true())
        sp.put([line(i, ft.true())])
        ft.tick(60)
    assert sender.flush(10)
    sp.close()                                   # power cut (close: the mark is written; the SIGKILL case
    #                                              relies on the last queued row and the once-a-minute mark)
    # a new boot 20 min after the last reading; fake-hwclock left the clock 45 min behind
    ft2 = FakeTime(boot_mono=15 * S, t0=before[-1] + 20 * 60 * S - 15 * S)
    ft2.error = -45 * 60 * S
    ft2.synced = False
    c = ft2.clock(boot="boot-2", grace_s=0)      # no grace: only the stored mark can tell
    sp = open_spool(tmp_path, c)
    sender = Sender(sp, sink)
    after_true = []
    for i in range(20):
        after_true.append(ft2.true())
        sp.put([line(100 + i, c.stamp_ns())])
        assert sender.flush(2)                   # InfluxDB is up: nothing held may leak out
        ft2.tick(5)
    assert sp.stats().held == 20
    ft2.error, ft2.synced = 0, True              # NTP: the true time
    sp.put([line(200, c.stamp_ns())])
    assert sender.flush(10)
    rows = influxd.query('SELECT "seq" FROM "dc_power"', fresh_db)[0]["values"]
    times = {int(seq): t for t, seq in rows}
    assert len(times) == 41
    for i, t in enumerate(after_true):
        assert times[100 + i] == t, "stamped with its true time"
        assert t > before[-1], "after everything InfluxDB had from before the reboot"
    sp.close()
    sink.close()


# ------------------------------------------------------------------------------------ with the poller

def test_poller_on_the_simulator_holds_then_stamps_true_times(tmp_path, sim):
    """The real poller reading the simulator, stamping through the clock, into the spool."""
    cfg_text = f"""
[poller]
interval_s = 1.0
host = "testhost"
[buses.a]
port = "{sim.path}"
timeout_s = 0.3
retries = 0
gap_s = 0.005
[[sensors]]
name = "battery"
bus = "a"
address = 1
"""
    (tmp_path / "config.toml").write_text(cfg_text)
    cfg = config.load(tmp_path / "config.toml", env={})
    ft = FakeTime()
    ft.error = FAKE_1970 - ft.wall()
    c = ft.clock()
    sp = open_spool(tmp_path, c)
    p = Poller(cfg, put=sp.put, clock=c)
    polled = []
    for _ in range(3):
        polled.append(ft.mono)
        assert len(p.poll_bus_once("a")) == 1
        ft.tick(1)
    assert sp.stats().held == 3 and sp.stats().depth == 0
    ft.error, ft.synced = 0, True
    p.poll_bus_once("a")
    got = stamps(sp)
    assert got[:3] == [ft.true(m) for m in polled] and got[3] == ft.true()
    p.close()
    sp.close()


def test_real_clock_checks_run_here():
    """The system's own answer (whatever it is here) comes back as True/False/None without raising, and
    the real clock is trusted on a machine whose time is after the floor and not unsynchronised."""
    from dcmon.clock import system_synced

    assert system_synced() in (True, False, None)
    c = Clock(synced=lambda: True)
    assert c.trusted() and abs(c.stamp_ns() - time.time_ns()) < 5 * S


@pytest.mark.parametrize("mark_written", [True])
def test_mark_survives_reopen(tmp_path, mark_written):
    ft = FakeTime()
    ft.synced = None
    sp = open_spool(tmp_path, ft.clock())
    sp.put([line(1, ft.true())])
    sp.ack([i for i, _ in sp.peek(10)])          # sent: the queue is empty, the mark stays
    sp.close()
    c = ft.clock()
    sp = open_spool(tmp_path, c)
    assert c.newest_ns == ft.true()
    sp.close()
