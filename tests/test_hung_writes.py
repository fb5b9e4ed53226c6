"""Writes that hang, and the way back after an outage (issue 19, item 3).

Real parts: a loopback TCP server that misbehaves on purpose (it trickles its answer one byte at a time,
so that no single read ever times out), the loopback HTTP server of test_sender.py scripted to answer 413
or 400, and the real influxd stopped and started again for the outage. The poller's failure logging runs
the real poller against the simulator with a garbling meter.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from dcmon import sender as sender_mod
from dcmon.config import InfluxConfig
from dcmon.errors import SinkRetryable
from dcmon.outputs.influx import InfluxSink, redact_url
from dcmon.reading import encode_line
from dcmon.sender import Sender
from dcmon.spool import Spool
from test_sender import fake, make_lines, messages  # noqa: F401  (same folder: conftest adds it to the path)


@pytest.fixture
def spool(tmp_path):
    sp = Spool.open(tmp_path / "spool.sqlite", max_bytes=64 << 20, max_age_s=86400 * 365)
    yield sp
    sp.close()


class Trickler:
    """Accepts, reads the request, then answers '204 No Content' one byte every ``gap`` seconds."""

    def __init__(self, gap: float = 0.25) -> None:
        self.gap = gap
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for b in b"HTTP/1.1 204 No Content\r\nX-Slow: " + b"x" * 200 + b"\r\n\r\n":
                    if self.stop.is_set():
                        return
                    conn.sendall(bytes([b]))
                    time.sleep(self.gap)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_trickling_server_cannot_hold_a_write_beyond_timeout(spool, caplog):
    """Each byte comes well within the 1 s per-read timeout; without a deadline on the whole request this
    write would take ~60 s. It must end within timeout_s, with one warning, and keep the lines."""
    srv = Trickler(gap=0.25)
    try:
        sink = InfluxSink(InfluxConfig(url=srv.url, database="dcmon", timeout_s=1.0))
        t = time.monotonic()
        with pytest.raises(SinkRetryable, match="no answer within 1 s"):
            sink.write(["m v=1 1"])
        assert time.monotonic() - t < 1.6
        caplog.set_level(logging.WARNING, logger="dcmon.sender")
        lines = make_lines(5)
        spool.put(lines)
        s = Sender(spool, sink)
        t = time.monotonic()
        assert s.flush(0.5) is False
        assert time.monotonic() - t < 2.0
        assert [x for _, x in spool.peek(10)] == lines
        assert len(messages(caplog, "no answer within 1 s")) == 1
        sink.close()
    finally:
        srv.close()


def test_413_batch_size_grows_back_after_successes(fake, spool, caplog, monkeypatch):
    """The server refuses anything above 4 lines for a while (413), then takes anything. The batch size
    shrinks, then grows back: a later 120-line backlog takes a handful of requests, not one per line."""
    monkeypatch.setattr(sender_mod, "REFUSED_MEMORY_S", 0.3)
    limit = {"n": 4}
    fake.answer = lambda lines: (413, {}, "too large") if len(lines) > limit["n"] else (204, {}, "")
    caplog.set_level(logging.INFO, logger="dcmon.sender")
    spool.put(make_lines(40))
    s = Sender(spool, InfluxSink(InfluxConfig(url=fake.url, database="dcmon", timeout_s=2.0)), batch_lines=64)
    assert s.flush(5) and s.batch_lines <= 4
    limit["n"] = 10**6                           # the admin raised the server's limit
    time.sleep(0.4)                              # the refused size is remembered for REFUSED_MEMORY_S
    fake.requests.clear()
    spool.put(make_lines(120, start=1000))
    assert s.flush(5)
    assert len(fake.requests) <= 8, [len(r) for _, r in fake.requests]  # 2, 2, 8, 8, 32, 32, 36 (was 120)
    assert len(fake.stored) == 160
    for _ in range(3):
        spool.put(make_lines(64, start=5000 + _ * 64))
        assert s.flush(5)
    assert s.batch_lines == 64
    assert messages(caplog, "batches of 64 lines again")


def test_refused_size_is_not_retried_at_once(fake, spool, monkeypatch):
    """A server whose limit stays low: growing back stops below the refused size for a while, so it does
    not cost a 413 on every other request."""
    fake.answer = lambda lines: (413, {}, "too large") if len(lines) > 10 else (204, {}, "")
    spool.put(make_lines(200))
    s = Sender(spool, InfluxSink(InfluxConfig(url=fake.url, database="dcmon", timeout_s=2.0)), batch_lines=64)
    assert s.flush(5)
    refused = sum(1 for _, r in fake.requests if len(r) > 10)
    assert refused <= 3, [len(r) for _, r in fake.requests]
    assert len(fake.stored) == 200


def test_refused_batch_logs_one_warning_with_the_count(fake, spool, caplog):
    """120 lines the server refuses for good (400, without naming lines: bisected to single lines): one
    warning with the count, not 120."""
    fake.answer = lambda lines: (400, {}, "bad timestamp")
    caplog.set_level(logging.WARNING, logger="dcmon.sender")
    spool.put(make_lines(120))
    s = Sender(spool, InfluxSink(InfluxConfig(url=fake.url, database="dcmon", timeout_s=2.0)))
    s.flush(10)
    assert spool.stats().quarantined == 120
    warned = messages(caplog, "refused")
    assert len(warned) == 1 and "refused 120 of 120 line(s)" in warned[0], warned


def test_backlog_drains_within_seconds_of_influxdb_return(own_influxd, spool, caplog):
    """InfluxDB down long enough for a 30 s back-off; it comes back: /ping probes every 2 s find it, and
    the backlog is in InfluxDB within seconds, not when the back-off ends."""
    influx = own_influxd
    influx.create_db("d")
    caplog.set_level(logging.INFO, logger="dcmon.sender")
    sink = InfluxSink(InfluxConfig(url=influx.url, database="d", timeout_s=2.0))
    s = Sender(spool, sink, min_backoff_s=30.0, max_backoff_s=60.0)
    stop = threading.Event()
    th = threading.Thread(target=s.run, args=(stop,))
    influx.stop()
    th.start()
    try:
        t0 = time.time_ns()
        spool.put([encode_line("dc_power", {"sensor": "m"}, {"voltage_v": 12.0, "seq": i}, t0 + i) for i in range(500)])
        s.poke()
        deadline = time.monotonic() + 10
        while s.send_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.send_failures >= 1 and s._retry_at - time.monotonic() > 20  # backing off for ~30 s
        influx.start()
        back = time.monotonic()
        while spool.stats().depth and time.monotonic() < back + 20:
            time.sleep(0.1)
        took = time.monotonic() - back
        assert spool.stats().depth == 0 and took < 5.0, f"drained {took:.1f} s after the server's return"
        assert influx.count("dc_power", db="d") == 500
        assert messages(caplog, "reachable again")
    finally:
        stop.set()
        s.poke()
        th.join(10)
        sink.close()


def test_user_info_never_in_where_or_errors(spool):
    assert redact_url("http://admin:PW@host:8086/x") == "http://***@host:8086/x"
    assert redact_url("see https://u@h and http://a:b@c:1") == "see https://***@h and http://***@c:1"
    cfg = InfluxConfig(url="http://127.0.0.1:9", database="d", timeout_s=0.5)
    object.__setattr__(cfg, "url", "http://admin:PW@127.0.0.1:9")  # as if it got past the config check
    sink = InfluxSink(cfg)
    spool.put(make_lines(1))
    s = Sender(spool, sink)
    s.flush(0.3)
    assert "PW" not in sink.where and "PW" not in s.last_error and "PW" not in spool.stats().last_error
    sink.close()


def test_noisy_line_logs_per_change_of_kind_not_per_hex_dump(tmp_path, caplog):
    """A meter whose replies are garbled half the time (a different hex dump each time): the poller warns
    when it starts failing and when the kind of failure changes, not once per differing dump."""
    from dcmon import config
    from dcmon.poller import Poller
    from dcmon.simulator import Simulator, meters_for

    meters = meters_for([("pzem017", 1)])
    meters[0].garble = 1.0
    with Simulator(meters) as sim:
        (tmp_path / "config.toml").write_text(f"""
[buses.a]
port = "{sim.path}"
timeout_s = 0.2
retries = 0
gap_s = 0.005
[[sensors]]
name = "battery"
bus = "a"
address = 1
""")
        cfg = config.load(tmp_path / "config.toml", env={})
        p = Poller(cfg, put=lambda lines: None)
        caplog.set_level(logging.WARNING, logger="dcmon.poller")
        for _ in range(20):
            p.poll_bus_once("a")
        p.close()
    st = p.states["battery"]
    assert st.polls_failed == 20
    warned = [r.getMessage() for r in caplog.records if "battery" in r.getMessage()]
    assert 1 <= len(warned) <= 2, warned
