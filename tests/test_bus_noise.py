"""The bus under line noise (issue 12), on the simulator on a real pty: leading junk, a foreign-address reply,
a truncated reply, the adapter's echo, garbage of any kind; the fast receive path is the one taken; the
receive's frame search as a property (hypothesis) and the whole bus fuzzed with random, truncated and foreign
frames; a dead meter's back-off; the bus loop's guard; the energy counter's plausibility.

Values are checked against published frames in tests/test_frames.py (the simulator shares our tables); here
the simulator supplies the faults and the counts are asserted."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus.client import ModbusSerialClient

from dcmon import config, poller as poller_mod
from dcmon.bus import Bus, BusSettings, LineStats, _Expect, _RtuClient
from dcmon.errors import BusError, DeviceError
from dcmon.meter import read_values
from dcmon.models import MODELS, PZEM017
from dcmon.poller import Poller, SensorState, bus_loop, is_plausible
from dcmon.simulator import Simulator, frame, meters_for

M = MODELS["pzem017"]
READ8 = bytes.fromhex("01 04 00 00 00 08 F1 CC")
EXPECT = _Expect(1, 0x04, 21, 16)


def _bus(path: str, *, timeout_s: float = 0.5, retries: int = 0) -> Bus:
    return Bus(BusSettings(name="noise", port=path, timeout_s=timeout_s, retries=retries, gap_s=0.0))


@pytest.fixture
def sim():
    with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as s:
        yield s


# ------------------------------------------------------------------------------ each glitch, recognised

GLITCHES = {
    "junk 1": (lambda s: setattr(s.faults(1), "junk", b"\x00"), {"resyncs": 1, "skipped_bytes": 1}),
    "junk 3": (lambda s: setattr(s.faults(1), "junk", b"\x00\x01\xff"), {"resyncs": 1, "skipped_bytes": 3}),
    "echo": (lambda s: setattr(s, "echo", True), {"echoes": 1, "resyncs": 0, "skipped_bytes": 0}),
    "foreign": (lambda s: setattr(s.faults(1), "foreign", 7), {"resyncs": 1, "skipped_bytes": 21}),
    "truncated": (lambda s: setattr(s.faults(1), "truncate", 9), {"resyncs": 1, "skipped_bytes": 9, "crc_errors": 1}),
}


@pytest.mark.parametrize("glitch", list(GLITCHES))
def test_each_glitch_costs_no_timeout_and_no_retry(sim, glitch):
    """The reply is found in the first attempt, well inside the timeout (no fallback wait), every time, and
    the counters say what was skipped."""
    setup, per_read = GLITCHES[glitch]
    setup(sim)
    with _bus(sim.path, timeout_s=0.5, retries=1) as bus:
        for _ in range(5):
            t = time.monotonic()
            v = read_values(bus, M, 1)
            assert time.monotonic() - t < 0.25, f"{glitch}: the read waited for its timeout"
            assert 12 < v["voltage_v"] < 15 and v["current_a"] > 0
        stats = bus.line_stats(1)
        assert bus.fast_receives == 5
    assert stats.replies == 5 and stats.retries == 0 and stats.bad_frames == 0
    for name, n in per_read.items():
        assert getattr(stats, name) == 5 * n, (name, stats)


def test_the_glitches_combined_still_find_the_right_reply(sim):
    sim.echo = True
    f = sim.faults(1)
    f.junk, f.foreign, f.truncate = b"\x00\x01", 2, 12      # echo, junk, another meter's reply, a cut-short one
    with _bus(sim.path) as bus:
        for _ in range(3):
            assert 12 < read_values(bus, M, 1)["voltage_v"] < 15
        assert 12 < read_values(bus, M, 2)["voltage_v"] < 15   # address 2 is clean
        s1, s2 = bus.line_stats(1), bus.line_stats(2)
    assert s1.replies == 3 and s1.echoes == 3 and s1.skipped_bytes == 3 * (2 + 21 + 12) and s1.retries == 0
    assert s2.replies == 1 and s2.skipped_bytes == 0 and s2.echoes == 1


def test_a_write_on_an_echoing_line_takes_the_second_copy(sim):
    """A write's reply is its own echo: once a read has shown that the line echoes, the first copy is skipped."""
    sim.echo = True
    with _bus(sim.path) as bus:
        read_values(bus, M, 1)                                  # learns the echo
        bus.write_register(1, 0x0003, 1)
        assert bus.read_holding_registers(1, 0x0003, 1) == [1]
        assert bus.line_stats(1).echoes == 3
    assert sim.meter(1).holding[3] == 1


# --------------------------------------------------------------------------- the fast path is the one taken

def test_the_fast_receive_is_the_path_taken(sim):
    """Fails if a pymodbus upgrade routes replies around _RtuClient.recv_frame (a silent fallback to the stock
    receive, which costs ~6 ms a reply and cannot resynchronise): every read must have gone through it."""
    with _bus(sim.path) as bus:
        for _ in range(4):
            read_values(bus, M, 1)
        bus.read_holding_registers(2, 0x0003, 1)
        assert bus.fast_receives == 5
        # the same check on the stock receive: it fails, so the assertion above can catch a fallback
        bus._client.recv = types.MethodType(ModbusSerialClient.recv, bus._client)  # noqa: SLF001
        read_values(bus, M, 1)
        assert bus.fast_receives == 5


# ------------------------------------------------------------------------- garbage: a counted bad frame

def test_the_fifo_head_01_18_05_that_killed_the_bus_thread(sim):
    """Issue 12 reproduced: pymodbus's own frame-size table raises IndexError on the head ``01 18 05`` (read FIFO
    queue: its byte count is two bytes), which the old 3-byte head read handed it. Now it is a bad frame."""
    client = _RtuClient("/dev/null", reply_timeout_s=0.1)
    head = bytes.fromhex("01 18 05")
    with pytest.raises(IndexError):
        client.framer.decoder.lookupPduClass(head).calculateRtuFrameSize(head)
    sim.faults(1).garbage.append(bytes.fromhex("01 18 05 00 03 00 01 00 02 00 03"))
    with _bus(sim.path, timeout_s=0.2) as bus:
        with pytest.raises(BusError, match="garbled reply.*01 18 05"):
            read_values(bus, M, 1)
        assert bus.line_stats(1).bad_frames == 1
        assert 12 < read_values(bus, M, 1)["voltage_v"] < 15     # the next poll


def test_garbage_then_a_retry_recovers_in_the_same_poll(sim):
    sim.faults(1).garbage.append(bytes.fromhex("01 04 10 ff ff"))   # a reply cut short, nothing after it
    with _bus(sim.path, timeout_s=0.2, retries=1) as bus:
        assert 12 < read_values(bus, M, 1)["voltage_v"] < 15
        s = bus.line_stats(1)
    assert s.bad_frames == 1 and s.retries == 1 and s.replies == 1


def _reply_for(address: int, words: list[int]) -> bytes:
    body = bytes([address, 0x04, 2 * len(words)]) + b"".join(w.to_bytes(2, "big") for w in words)
    return frame(body)


GOOD = _reply_for(1, [1344, 10, 0, 13, 0, 2, 0, 0])   # the ESPHome frame's values (test_frames.py)


@st.composite
def line_noise(draw) -> bytes:
    """What can be on the line instead of one reply: random bytes, frames cut short, valid frames from other
    addresses or for other functions, our head with a wrong CRC, in any order, maybe ending in our reply."""
    parts = draw(st.lists(st.one_of(
        st.binary(min_size=1, max_size=40),
        st.builds(lambda a, w: _reply_for(a, w), st.integers(0, 255).filter(lambda a: a != 1),
                  st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=12)),
        st.builds(lambda n: GOOD[:n], st.integers(1, len(GOOD) - 1)),
        st.builds(lambda fc, data: frame(bytes([1, fc]) + data), st.integers(0, 255).filter(lambda f: f not in (4, 0x84)),
                  st.binary(max_size=30)),
        st.builds(lambda x: GOOD[:-1] + bytes([GOOD[-1] ^ x]), st.integers(1, 255)),
    ), min_size=1, max_size=5))
    return b"".join(parts)


FUZZ = int(os.environ.get("DCMON_FUZZ_EXAMPLES", "25"))


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(noise=line_noise(), then_good=st.booleans())
def test_fuzz_any_bytes_end_in_a_bad_frame_or_a_reply_and_the_bus_recovers(sim, noise, then_good):
    sim.faults(1).garbage.append(noise + (_reply_for(1, sim.meter(1).input_words()) if then_good else b""))
    with _bus(sim.path, timeout_s=0.08) as bus:
        before = bus.line_stats(1)
        try:
            read_values(bus, M, 1)
            failed = False
        except (BusError, DeviceError):
            failed = True
        after = bus.line_stats(1)
        if failed:   # a garbled reply, line noise without our address, or a valid exception reply
            assert (after.bad_frames == before.bad_frames + 1 or after.skipped_bytes > before.skipped_bytes
                    or after.replies == before.replies + 1)
        time.sleep(0.01)                                        # the simulator's 10 ms end-of-frame silence
        assert 12 < read_values(bus, M, 1)["voltage_v"] < 15, noise.hex(" ")   # always: the next poll
        assert bus.fast_receives == 2


# ------------------------------------------------------------------ the frame search as a property

class _Line:
    """The bytes of one exchange, handed to the receive in the pieces it asks for: a stand-in for the serial
    port (a pty cannot be made to deliver an exact byte count per read), so thousands of cases run in seconds.
    It records every read size, to check that the receive never asks for a byte that is not coming."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.asks, self.timeout = data, 0, [], 0.5

    def read(self, n: int) -> bytes:
        self.asks.append((self.pos, n))
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _receive(data: bytes, sent: bytes = READ8) -> tuple[bytes, _Line, LineStats]:
    client = _RtuClient("/dev/null", reply_timeout_s=0.5)
    line = _Line(data)
    client.socket = line  # type: ignore[assignment]
    client._sent = sent  # noqa: SLF001
    got = client.recv_frame(EXPECT)
    return got, line, client.stats[1]


@settings(max_examples=600, deadline=None)
@given(before=line_noise(), after=st.binary(max_size=30))
def test_the_reply_is_found_behind_any_noise_without_reading_past_it(before, after):
    data = before + GOOD + after
    got, line, stats = _receive(data)
    assert got, data.hex(" ")
    assert got[0] == 1 and got[1] in (0x04, 0x84)          # a reply for us, CRC checked, maybe an earlier one
    end = data.index(got) + len(got)
    assert line.pos == end, "it read beyond the reply (it would have waited for bytes that are not coming)"
    if got == GOOD:
        assert end == len(before) + len(GOOD) or data.index(GOOD) < len(before)


def test_a_clean_reply_is_one_read():
    got, line, stats = _receive(GOOD)
    assert got == GOOD and line.asks == [(0, 21)] and stats.resyncs == 0


def test_junk_costs_only_the_missing_bytes():
    got, line, stats = _receive(b"\x00" + GOOD)
    assert got == GOOD and line.asks == [(0, 21), (21, 1)] and stats.skipped_bytes == 1
    got, line, stats = _receive(READ8 + GOOD)                 # the echo
    # 8 bytes are missing if the reply starts at byte 8; an exception reply (5 bytes) could start after byte 21
    assert got == GOOD and line.asks == [(0, 21), (21, 5), (26, 3)] and stats.echoes == 1 and stats.skipped_bytes == 0


# ----------------------------------------------------------------------------------- a dead meter

CFG = """
[poller]
interval_s = 0
settle_s = 0
health_interval_s = 0

[buses.a]
port = "{port}"
timeout_s = 0.1
retries = 1
gap_s = 0.005

[[sensors]]
name = "dead"
bus = "a"
address = 1

[[sensors]]
name = "alive"
bus = "a"
address = 2
"""


def _cfg(tmp_path, port):
    p = tmp_path / "config.toml"
    p.write_text(CFG.format(port=port))
    return config.load(p, env={})


def test_backoff_schedule_doubles_to_its_cap_and_ends_on_an_answer():
    st_ = SensorState(cfg=None)  # type: ignore[arg-type]
    now = 1000.0
    delays = []
    for _ in range(10):
        if st_.due(now):
            st_.note_failure(now)
            delays.append(st_.backoff_s)
        now += 1.0
    assert delays[:2] == [0.0, 0.0] and delays[2] == poller_mod.BACKOFF_FIRST_S
    st_ = SensorState(cfg=None)  # type: ignore[arg-type]
    for _ in range(12):
        st_.note_failure(now)
    assert st_.backoff_s == poller_mod.BACKOFF_MAX_S and st_.tries == 1
    assert not st_.due(now + 1) and st_.due(now + poller_mod.BACKOFF_MAX_S)
    assert st_.backoff_status(now)["retry_in_s"] == poller_mod.BACKOFF_MAX_S
    st_.polls_ok += 1                                          # the probe was answered
    assert st_.due(now) and st_.backoff_s == 0 and st_.tries is None and st_.backoff_status(now)["backoff_s"] == 0


def test_a_dead_meter_is_backed_off_and_noticed_when_it_comes_back(tmp_path, sim, monkeypatch, caplog):
    monkeypatch.setattr(poller_mod, "BACKOFF_FIRST_S", 0.3)   # the shipped 2 → 60 s, scaled down for the test
    monkeypatch.setattr(poller_mod, "BACKOFF_MAX_S", 0.6)
    caplog.set_level(logging.INFO)
    sim.meter(1).silent = True
    p = Poller(_cfg(tmp_path, sim.path), put=lambda lines: None)
    dead, alive = p.states["dead"], p.states["alive"]
    try:
        t = time.monotonic()
        while time.monotonic() - t < 2.0:
            p.poll_bus_once("a")
        # one full poll (2 tries), two of 1 try, then probes every 0.3, 0.6, 0.6 … s (1 try each)
        assert 4 <= dead.polls_failed <= 3 + 2.0 / 0.3 + 1
        assert dead.polls_skipped > 5 * dead.polls_failed and alive.polls_ok > 5 * dead.polls_failed
        assert p.buses["a"].line_stats(1).retries == 1      # only the first poll retried
        s = p.status()["sensors"]["dead"]
        assert s["backoff_s"] == 0.6 and 0 <= s["retry_in_s"] <= 0.6 and s["up"] is False
        sim.meter(1).silent = False
        t = time.monotonic()
        while dead.polls_ok == 0 and time.monotonic() - t < 2.0:
            p.poll_bus_once("a")
        back_after = time.monotonic() - t
        p.poll_bus_once("a")
    finally:
        p.close()
    assert dead.polls_ok >= 1 and back_after <= 0.6 + 0.2       # noticed within the cap (+ one cycle)
    assert p.status()["sensors"]["dead"]["backoff_s"] == 0 and dead.up is True
    msgs = [r.getMessage() for r in caplog.records if "dead" in r.getMessage()]
    assert sum("no answer" in m for m in msgs) == 1 and sum("down after 3 failed polls" in m for m in msgs) == 1
    assert any("answers again" in m for m in msgs)
    assert any("backoff_s=0" in ln for ln in p.health_lines() if "sensor=dead" in ln)


# --------------------------------------------------------------------------------- the loop's guard

def test_an_unexpected_exception_in_a_cycle_is_counted_and_the_loop_goes_on(tmp_path, sim, caplog):
    caplog.set_level(logging.DEBUG, logger="dcmon.poller")
    calls = []

    def put(lines: list[str]) -> None:       # the spool's put, failing once in a way nobody expects
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("injected")

    p = Poller(_cfg(tmp_path, sim.path), put=put)
    stop = threading.Event()
    th = threading.Thread(target=bus_loop, args=(p, "a", stop))
    th.start()
    t = time.monotonic()
    while len(calls) < 3 and time.monotonic() - t < 5:
        time.sleep(0.05)
    stop.set()
    th.join(5)
    p.close()
    assert len(calls) >= 3 and not th.is_alive() and p.loop_errors == {"a": 1}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "RuntimeError: injected" in errors[0].getMessage() and "polling goes on" in errors[0].getMessage()
    assert errors[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)     # the traceback, at debug
    assert calls[1] - calls[0] >= 0.9                          # no spinning after a failed cycle
    assert any("loop_errors=1i" in ln for ln in p.health_lines() if "sensor=_poller" in ln)


# ------------------------------------------------------------------------- an impossible energy counter

def _v(energy: float) -> dict[str, float | bool]:
    return {"voltage_v": 13.0, "current_a": 1.0, "power_w": 13.0, "energy_wh": energy}


def test_counter_plausibility():
    s = SensorState(cfg=types.SimpleNamespace(name="m"))  # type: ignore[arg-type]
    assert is_plausible(PZEM017, _v(1000), s, 0.0) == ""
    assert "maximum" in is_plausible(PZEM017, _v(0xFFFFFFFF), s, 1.0)
    assert "maximum" in is_plausible(PZEM017, _v(0xFFFFFFFF))           # without history too
    assert is_plausible(PZEM017, _v(1001), s, 2.0) == ""                # the series goes on
    # 90 kW at most: 1 h later up to ~108 kWh more; 10 s later not 1 MWh more
    assert "rose" in is_plausible(PZEM017, _v(1_001_001), s, 12.0)
    assert is_plausible(PZEM017, _v(50), s, 13.0) == ""                 # a drop: a reset, not a glitch
    assert is_plausible(PZEM017, _v(50 + 100_000), s, 13.0 + 3600) == ""
    # a counter that really jumped: accepted once three readings in a row agree
    s = SensorState(cfg=types.SimpleNamespace(name="m"))  # type: ignore[arg-type]
    assert is_plausible(PZEM017, _v(10), s, 0.0) == ""
    assert [is_plausible(PZEM017, _v(5_000_000 + i), s, 1.0 + i) == "" for i in range(4)] == [False, False, True, True]


def test_a_valid_crc_spike_is_discarded_and_the_series_goes_on(tmp_path, sim, caplog):
    lines: list[str] = []
    sim.meter(1).energy_wh = 1000.0
    p = Poller(_cfg(tmp_path, sim.path), put=lines.extend)
    try:
        first = p.poll_bus_once("a")[0]
        sim.meter(1).energy_wh = float(0xFFFFFFFF)              # what a PZEM-017 sent around a brown-out
        spiked = p.poll_bus_once("a")
        sim.meter(1).energy_wh = 1001.0
        after = p.poll_bus_once("a")[0]
    finally:
        p.close()
    assert first.sensor == "dead" and first.fields["energy_wh"] == 1000
    assert [r.sensor for r in spiked] == ["alive"] and p.states["dead"].discarded == 1
    assert after.sensor == "dead" and after.fields["energy_wh"] == 1001 and after.fields["energy_reset"] is False
    assert not any("4294967295" in ln and "sensor=dead" in ln for ln in lines)
    assert any("implausible reading discarded" in r.getMessage() and "maximum" in r.getMessage() for r in caplog.records)


def test_random_seeded_line_noise_never_stops_a_polling_bus(tmp_path, sim, monkeypatch):
    """A seeded generator (reproducible with DCMON_FAULT_SEED) puts noise before, instead of and after replies
    while the real bus loop runs: the thread lives, both meters keep being read, nothing odd is stored."""
    monkeypatch.setattr(poller_mod, "BACKOFF_FIRST_S", 0.2)  # replies lost to noise 3 times in a row back off
    monkeypatch.setattr(poller_mod, "BACKOFF_MAX_S", 0.4)
    seed = int(os.environ.get("DCMON_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    lines: list[str] = []
    cfg = _cfg(tmp_path, sim.path)
    p = Poller(cfg, put=lines.extend)
    stop = threading.Event()
    th = threading.Thread(target=bus_loop, args=(p, "a", stop))
    th.start()
    try:
        for _ in range(30):
            addr = rng.choice((1, 2))
            f = sim.faults(addr)
            kind = rng.randrange(4)
            if kind == 0:
                f.garbage.append(rng.randbytes(rng.randrange(1, 30)))
            elif kind == 1:
                f.junk = rng.randbytes(rng.randrange(0, 4))
            elif kind == 2:
                f.truncate = rng.randrange(0, 20)
            else:
                sim.noise(rng.randbytes(rng.randrange(1, 10)))
            time.sleep(0.03)
        for a in (1, 2):
            sim.faults(a).junk, sim.faults(a).truncate = b"", 0
            sim.faults(a).garbage.clear()
        ok0 = {n: s.polls_ok for n, s in p.states.items()}
        t = time.monotonic()
        while not all(s.polls_ok > ok0[n] + 2 for n, s in p.states.items()) and time.monotonic() - t < 3:
            time.sleep(0.05)
        assert th.is_alive(), f"seed {seed}"
        assert all(s.polls_ok > ok0[n] + 2 for n, s in p.states.items()), f"seed {seed}"
        skipped = sum(p.buses["a"].line_stats(a).skipped_bytes for a in (1, 2))
        assert skipped >= 1, f"seed {seed}: the noise was never noticed"
    finally:
        stop.set()
        th.join(5)
        p.close()
    assert p.loop_errors == {}, f"seed {seed}"
    assert all("voltage_v=1" in ln for ln in lines), f"seed {seed}"   # 12–15 V: no garbage became a reading


def test_a_dead_meter_behind_an_echo_or_turnaround_junk_is_silent_not_garbled(sim):
    """Found by trying it: on an echoing adapter the only bytes a dead meter's poll gets are our own request,
    and some adapters add a 0x00 at every turnaround. Neither is an answer: the poll is a NoResponse (so the
    back-off applies), not a garbled reply."""
    from dcmon.errors import NoResponse

    sim.echo = True
    sim.faults(3).junk = b"\x00"                 # nobody answers address 3, but the line says 00 anyway
    with _bus(sim.path, timeout_s=0.1) as bus:
        with pytest.raises(NoResponse) as e:
            bus.read_input_registers(3, 0, 8)
        s = bus.line_stats(3)
    assert s.echoes == 1 and s.bad_frames == 0 and s.skipped_bytes == 1
    assert "garbled" not in str(e.value) and "1 byte(s) of line noise: 00" in str(e.value)
