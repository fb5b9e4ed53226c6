"""The sender against a small HTTP server on loopback that answers what each test tells it to.

Why a fake server here: the real influxd (tests/test_faults.py uses it) cannot be made to answer 401, 413,
429 + Retry-After, 500, 503, slow answers or dropped connections on demand. This one is a real HTTP server
(http.server in a thread on 127.0.0.1) and the real InfluxSink talks to it over TCP; only the answers are
scripted. Its 400 bodies copy InfluxDB's: 2.x names "line N", 1.x quotes the line ("unable to parse '...'").
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dcmon.config import InfluxConfig
from dcmon.outputs.influx import InfluxSink
from dcmon.reading import encode_line
from dcmon.sender import Sender
from dcmon.spool import Spool

T0 = time.time_ns()
Answer = tuple[int, dict[str, str], str] | str  # (status, headers, body), or "drop" / ("slow", ...) handled below


class FakeInflux:
    """Records every request's lines; ``answer(lines) -> (status, headers, body)`` or "drop" decides the
    reply. ``stored`` keeps the lines of 2xx requests (what a real server would have)."""

    def __init__(self) -> None:
        self.answer: Callable[[list[str]], Answer] = lambda lines: (204, {}, "")
        self.requests: list[tuple[float, list[str]]] = []
        self.stored: list[str] = []
        self.delay = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                got = [x for x in body.split("\n") if x]
                fake.requests.append((time.monotonic(), got))
                if fake.delay:
                    time.sleep(fake.delay)
                ans = fake.answer(got)
                if ans == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, text = ans
                if 200 <= status < 300:
                    fake.stored.extend(got)
                data = json.dumps({"error": text}).encode() if text else b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeInflux:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    with FakeInflux() as f:
        yield f


@pytest.fixture
def spool(tmp_path: Path):
    sp = Spool.open(tmp_path / "spool.sqlite", max_bytes=64 << 20, max_age_s=86400 * 365)
    yield sp
    sp.close()


def make_lines(n: int, start: int = 0) -> list[str]:
    return [encode_line("dc_power", {"sensor": "s1"}, {"voltage_v": 12.5, "seq": start + i}, T0 + start + i)
            for i in range(n)]


def sender_for(spool: Spool, url: str, *, batch: int = 5000, timeout: float = 2.0, **kw) -> Sender:
    sink = InfluxSink(InfluxConfig(url=url, database="dcmon", timeout_s=timeout))
    return Sender(spool, sink, batch_lines=batch, **kw)


def queued(spool: Spool) -> list[str]:
    return [line for _, line in spool.peek(10**6)]


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_all_sent_in_order_and_acked(fake, spool):
    lines = make_lines(23)
    spool.put(lines)
    s = sender_for(spool, fake.url, batch=10)
    assert s.flush(5) is True
    assert fake.stored == lines  # oldest first
    assert [len(r) for _, r in fake.requests] == [10, 10, 3]
    assert s.sent_points == 23 and spool.stats().depth == 0
    other = sqlite3.connect(spool.path)  # flush committed the (deferred) acks: gone from the file too
    assert other.execute("SELECT count(*) FROM queue").fetchone()[0] == 0
    other.close()


def test_400_naming_line_quarantines_only_that_line(fake, spool):
    """InfluxDB 2.x style: the server names the line number; nothing of that batch was written."""
    lines = make_lines(6)
    lines[2] = "dc_power,sensor=s1 voltage_v=oops " + str(T0 + 2)

    def answer(got: list[str]) -> Answer:
        for i, line in enumerate(got):
            if "oops" in line:
                return 400, {}, f"partial write: unable to parse '{line}': invalid field format: line {i + 1}"
        return 204, {}, ""
    fake.answer = answer
    spool.put(lines)
    s = sender_for(spool, fake.url)
    assert s.flush(5) is True
    assert fake.stored == lines[:2] + lines[3:]
    assert [q.line for q in spool.quarantine_list()] == [lines[2]]
    assert len(fake.requests) == 2  # no bisection needed


def test_400_quoting_line_influxdb1_style(fake, spool, caplog):
    """InfluxDB 1.x: a partial write stores the good lines and quotes the bad one (no line number)."""
    lines = make_lines(8)
    lines[5] = "dc_power,sensor=s1 voltage_v= " + str(T0 + 5)

    def answer(got: list[str]) -> Answer:
        bad = [x for x in got if "voltage_v= " in x]
        if bad:
            fake.stored.extend(x for x in got if x not in bad)
            return 400, {}, f"partial write: unable to parse '{bad[0]}': missing field value dropped=0"
        return 204, {}, ""
    fake.answer = answer
    spool.put(lines)
    caplog.set_level(logging.WARNING)
    s = sender_for(spool, fake.url)
    assert s.flush(5) is True
    assert sorted(set(fake.stored)) == sorted(set(lines) - {lines[5]})
    assert [q.line for q in spool.quarantine_list()] == [lines[5]]
    assert len(messages(caplog, "quarantine")) == 1


def test_400_without_details_is_bisected(fake, spool):
    """A type conflict answer says nothing about which line (and 1.x writes nothing): split to find them."""
    lines = make_lines(40)
    bad = {7, 8, 31}
    for i in bad:
        lines[i] = encode_line("dc_power", {"sensor": "s1"}, {"voltage_v": 1, "seq": i}, T0 + i)  # integer!

    def answer(got: list[str]) -> Answer:
        if any(" voltage_v=1i," in x for x in got):
            return 400, {}, 'field type conflict: input field "voltage_v" on measurement "dc_power" is type integer'
        return 204, {}, ""
    fake.answer = answer
    spool.put(lines)
    s = sender_for(spool, fake.url)
    assert s.flush(10) is True
    assert fake.stored == [x for i, x in enumerate(lines) if i not in bad]  # order kept
    assert sorted(q.line for q in spool.quarantine_list()) == sorted(lines[i] for i in bad)
    assert len(fake.requests) < 40


@pytest.mark.parametrize(("status", "words"), [(401, "refused"), (403, "refused"), (404, "not found")])
def test_auth_and_not_found_keep_everything(fake, spool, caplog, status, words):
    lines = make_lines(5)
    fake.answer = lambda got: (status, {}, "authorization failed" if status != 404 else 'database not found: "dcmon"')
    spool.put(lines)
    caplog.set_level(logging.INFO)
    s = sender_for(spool, fake.url)
    assert s.flush(0.5) is False
    assert queued(spool) == lines and spool.stats().quarantined == 0
    errs = messages(caplog, "keeping readings in the spool")
    assert len(errs) == 1 and words in errs[0] and "(5 queued)" in errs[0]
    assert words in spool.stats().last_error and s.send_failures >= 1
    fake.answer = lambda got: (204, {}, "")
    assert s.flush(5) is True
    assert fake.stored == lines
    assert len(messages(caplog, "reachable again; sending 5 queued readings")) == 1


def test_413_splits_and_remembers(fake, spool):
    lines = make_lines(20)
    huge = encode_line("dc_power", {"sensor": "s1"}, {"note": "x" * 5000}, T0 + 99)
    fake.answer = lambda got: (413, {}, "request entity too large") if len(got) > 4 or any(
        len(x) > 4000 for x in got) else (204, {}, "")
    spool.put(lines[:10] + [huge] + lines[10:])
    s = sender_for(spool, fake.url, batch=16)
    assert s.flush(10) is True
    assert fake.stored == lines
    assert [q.line for q in spool.quarantine_list()] == [huge]  # too large even alone
    assert s.batch_lines <= 4


def test_429_retry_after_is_honoured(fake, spool, caplog):
    answers = iter([(429, {"Retry-After": "1"}, "too many requests")])
    fake.answer = lambda got: next(answers, (204, {}, ""))
    lines = make_lines(3)
    spool.put(lines)
    caplog.set_level(logging.INFO)
    s = sender_for(spool, fake.url, min_backoff_s=0.05)
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while spool.stats().depth and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(5)
    assert fake.stored == lines
    (t1, _), (t2, _) = fake.requests[:2]
    assert t2 - t1 >= 0.95  # waited as long as asked, not the 0.05 s back-off
    assert len(messages(caplog, "keeping readings")) == 1 and "429" in messages(caplog, "keeping readings")[0]


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_back_off_and_log_once(fake, spool, caplog, status):
    fails = {"n": 0}

    def answer(got: list[str]) -> Answer:
        if fails["n"] < 5:
            fails["n"] += 1
            return status, {}, "internal error" if status == 500 else "service unavailable"
        return 204, {}, ""
    fake.answer = answer
    caplog.set_level(logging.INFO)
    s = sender_for(spool, fake.url, min_backoff_s=0.02, max_backoff_s=0.1)
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,))
    t.start()
    try:
        lines = make_lines(30)
        for i in range(0, 30, 3):  # readings keep arriving during the outage
            spool.put(lines[i:i + 3])
            s.poke()
            time.sleep(0.03)
        deadline = time.monotonic() + 5
        while (spool.stats().depth or len(fake.stored) < 30) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(5)
    assert fake.stored == lines
    assert s.send_failures == 5
    gaps = [b[0] - a[0] for a, b in zip(fake.requests, fake.requests[1:])][:4]
    assert gaps[-1] >= gaps[0]  # the pauses grow (exponential back-off)
    assert len(messages(caplog, "keeping readings in the spool")) == 1  # one line per state change
    assert len(messages(caplog, "reachable again")) == 1
    assert len(messages(caplog, "backlog sent")) == 1


def test_slow_answer_times_out_then_resend_is_harmless(fake, spool):
    """The server took the batch but answered too late: it is sent again, with the same timestamps, so a
    real InfluxDB overwrites the same points (the stored set has no new entries)."""
    lines = make_lines(4)
    spool.put(lines)
    fake.delay = 0.6
    s = sender_for(spool, fake.url, timeout=0.2)
    assert s.flush(0.3) is False
    assert queued(spool) == lines and "no answer within" in s.last_error
    fake.delay = 0
    assert s.flush(5) is True
    assert set(fake.stored) == set(lines)


def test_dropped_connection_keeps_lines(fake, spool):
    lines = make_lines(4)
    spool.put(lines)
    fake.answer = lambda got: "drop"
    s = sender_for(spool, fake.url)
    assert s.flush(0.3) is False
    assert queued(spool) == lines and "InfluxDB at" in s.last_error
    fake.answer = lambda got: (204, {}, "")
    assert s.flush(5) is True and fake.stored == lines


def test_connection_refused_message_and_bounded_flush(spool, caplog):
    lines = make_lines(2)
    spool.put(lines)
    caplog.set_level(logging.INFO)
    with FakeInflux() as dead:
        url = dead.url  # a port that was just free
    s = sender_for(spool, url)
    t = time.monotonic()
    assert s.flush(0.5) is False
    assert time.monotonic() - t < 2
    msg = messages(caplog, "keeping readings")
    assert len(msg) == 1 and "connection refused (is InfluxDB running?)" in msg[0] and "(2 queued)" in msg[0]


def test_poke_wakes_and_stop_is_prompt(fake, spool):
    s = sender_for(spool, fake.url)
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.3)  # idle now, waiting for a poke (the idle tick is 5 s)
        spool.put(make_lines(1))
        t0 = time.monotonic()
        s.poke()
        while not fake.stored and time.monotonic() - t0 < 3:
            time.sleep(0.01)
        assert fake.stored and time.monotonic() - t0 < 1.0
        fake.answer = lambda got: (503, {"Retry-After": "60"}, "busy")
        spool.put(make_lines(1, start=1))
        s.poke()
        time.sleep(0.3)  # now in a 60 s back-off
    finally:
        t0 = time.monotonic()
        stop.set()
        t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0


def test_disabled_sink_keeps_lines(spool):
    lines = make_lines(3)
    spool.put(lines)
    s = Sender(spool, None)
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,))
    t.start()
    time.sleep(0.2)
    stop.set()
    t.join(2)
    assert not t.is_alive()
    assert s.flush(0.1) is False and queued(spool) == lines and s.sent_points == 0


def test_min_send_interval_groups_cycles(fake, spool):
    s = sender_for(spool, fake.url, min_send_interval_s=0.4)
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,))
    t.start()
    try:
        lines = make_lines(40)
        for i in range(0, 40, 4):  # a cycle every 0.1 s, each poked
            spool.put(lines[i:i + 4])
            s.poke()
            time.sleep(0.1)
        deadline = time.monotonic() + 3
        while len(fake.stored) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(5)
    assert fake.stored == lines
    assert 2 <= len(fake.requests) <= 5  # about one send per 0.4 s, not one per poke (10)


def test_close_shuts_the_read_ahead_pool_down(fake, spool):
    """A backlog is read ahead on a pool thread; close() ends that thread (issue 16)."""
    spool.put(make_lines(30))
    s = sender_for(spool, fake.url, batch=10)
    assert s.send_once() is True                        # a full batch: the next one is read ahead
    workers = list(s._pool._threads)                    # noqa: SLF001 - the pool's own threads
    assert workers and all(t.is_alive() for t in workers)
    s.close()
    assert not any(t.is_alive() for t in workers)
    s.close()  # twice is harmless
