"""The HTTP output with real parts: the simulator on a pty read by a real Poller, Debian's prometheus scraping
/metrics, promtool checking the exposition, and the page in headless Chromium (driven over the DevTools
protocol on a pipe: no websocket library needed).

The poller is fed to the output the way the lead wires it: ``on_reading`` for each reading and, after each
poll, ``meter_state(sensor, up, labels)`` for each meter (``feed`` below).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import Prometheus, free_port

from dcmon import config
from dcmon.errors import ConfigError
from dcmon.outputs import http as h
from dcmon.outputs.http import HttpOutput, HttpSettings, hash_password, redact, verify_password
from dcmon.poller import Poller
from dcmon.reading import Reading
from dcmon.simulator import Simulator, meters_for

CFG = """
[poller]
host = "boat"

[buses.dc]
port = "{dc}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[buses.ac]
port = "{ac}"
timeout_s = 0.15
retries = 0
gap_s = 0.005

[[sensors]]
name = "battery"
bus = "dc"
address = 1

[[sensors]]
name = "solar"
bus = "dc"
address = 2

[[sensors]]
name = "shore"
bus = "ac"
address = 1
model = "pzem004t"
"""


@pytest.fixture
def sims():
    with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as dc, \
            Simulator(meters_for([("pzem004t", 1)])) as ac:
        yield dc, ac


@pytest.fixture
def poller(tmp_path, sims):
    dc, ac = sims
    p = tmp_path / "config.toml"
    p.write_text(CFG.format(dc=dc.path, ac=ac.path))
    poller = Poller(config.load(p, env={}), put=lambda lines: None)
    yield poller
    poller.close()


def status_of(poller: Poller, **extra):
    def status() -> dict:
        return {**poller.status(), "spool": {"depth": 3, "bytes": 512, "oldest_time_ns": time.time_ns() - 7_000_000_000,
                                             "dropped_total": 0, "lost_total": 0, "quarantined": 0, "last_error": ""},
                "sender_error": "", **extra}
    return status


def feed(poller: Poller, out: HttpOutput) -> list[Reading]:
    """One cycle of every bus into the output, as the poller will do it once wired."""
    readings = []
    for bus in poller.buses:
        for r in poller.poll_bus_once(bus):
            out.on_reading(r)
            readings.append(r)
        for st in poller.states.values():
            if st.cfg.bus == bus:
                out.meter_state(st.name, bool(st.up), {"host": poller.host, "bus": st.cfg.bus, "model": st.cfg.model})
    return readings


def settings(**kw) -> HttpSettings:
    return HttpSettings.from_dict({"enabled": True, "listen": f"127.0.0.1:{free_port()}", **kw}, "config.toml")


# ------------------------------------------------------------------------------------------------ settings

def test_defaults_are_off_and_on_loopback_only():
    s = HttpSettings.from_dict({}, "config.toml")
    assert HttpSettings.defaults() == {"enabled": False, "listen": "127.0.0.1:9917", "username": "", "password_hash": "",
                                       "page": True}
    assert s.address == ("127.0.0.1", 9917) and not s.auth and not s.enabled
    assert HttpSettings.from_dict({"listen": "[::1]:8080"}, "c").address == ("::1", 8080)
    assert HttpSettings.from_dict({"listen": "0.0.0.0:9917", "enabled": "true"}, "c").enabled is True


@pytest.mark.parametrize("data, key, words", [
    ({"listne": "x"}, "http.listne", "did you mean http.listen"),
    ({"enabled": "maybe"}, "http.enabled", "true or false"),
    ({"listen": "9917"}, "http.listen", "address:port"),
    ({"listen": "pi.local:9917"}, "http.listen", "not an IPv4 address"),
    ({"listen": "[1.2.3.4]:9917"}, "http.listen", "not an IPv6 address"),
    ({"listen": "127.0.0.1:99999"}, "http.listen", "1 to 65535"),
    ({"password": "hunter2", "username": "me"}, "http.password", "dcmon http-password"),
    ({"username": "me"}, "http.password_hash", "dcmon http-password"),
    ({"password_hash": hash_password("x", iterations=1000)}, "http.username", "user name"),
    ({"username": "me", "password_hash": "hunter2"}, "http.password_hash", "pbkdf2_sha256$"),
    ({"username": "me", "password_hash": "pbkdf2_sha256$10$salt$AAAAAAAAAAAAAAAAAAAAAA=="}, "http.password_hash", "weak"),
    ({"username": "a:b", "password_hash": hash_password("x", iterations=1000)}, "http.username", "':'"),
    ({"page": 1}, "http.page", "true or false"),
])
def test_every_bad_key_is_one_config_error_naming_it(data, key, words):
    with pytest.raises(ConfigError) as e:
        HttpSettings.from_dict(data, "/etc/dcmon/config.toml")
    assert e.value.key == key and e.value.file == "/etc/dcmon/config.toml" and words in str(e.value), str(e.value)
    assert "hunter2" not in str(e.value)


def test_password_hash_is_salted_pbkdf2_in_djangos_format():
    a, b = hash_password("correct horse", iterations=1000), hash_password("correct horse", iterations=1000)
    assert a != b and a.startswith("pbkdf2_sha256$1000$") and len(a.split("$")) == 4
    assert verify_password("correct horse", a) and not verify_password("correct hors", a)
    # Django 4.2's own test vector (django/django tests/auth_tests/test_hashers.py, test_pbkdf2): same format
    vector = "pbkdf2_sha256$600000$seasalt$OAXyhAQ/4ZDA9V5RMExt3C1OwQdUpLZ99vm1McFlLRA="
    assert hash_password("lètmein", iterations=600_000, salt="seasalt") == vector
    assert verify_password("lètmein", vector) and not verify_password("lètmeinz", vector)


def test_http_password_command_prints_a_config_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "http-password", "--iterations", "2000"], input="pa ss\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith('password_hash = "pbkdf2_sha256$2000$') and "pa ss" not in line
    assert verify_password("pa ss", line.split('"')[1])
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "http-password"], input="\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_a_port_in_use_is_one_config_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        st = HttpSettings.from_dict({"enabled": True, "listen": f"127.0.0.1:{port}"}, "config.toml")
        with pytest.raises(ConfigError) as e:
            HttpOutput(st, status=dict, healthy=lambda: True).start()
    assert e.value.key == "http.listen" and "cannot listen" in str(e.value)


# ----------------------------------------------------------------------------------- /status /healthz auth

def test_status_is_the_status_dict_without_secrets_and_healthz_follows_healthy(poller):
    healthy = threading.Event()
    healthy.set()
    extra = {"influxdb": {"url": "http://admin:s3cret@db:8086", "token": "tok-123", "password": "pw-456"},
             "mqtt": {"url": "mqtts://u:pw-789@broker", "connected": True}, "sender_error": "401 from http://x:tok@db/"}
    with HttpOutput(settings(), status=status_of(poller, **extra), healthy=healthy.is_set, host="boat") as out:
        feed(poller, out)
        r = httpx.get(out.url + "/status")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        got = r.json()
        for secret in ("s3cret", "tok-123", "pw-456", "pw-789", "x:tok"):
            assert secret not in r.text
        assert got["influxdb"]["token"] == "<redacted>" and got["influxdb"]["url"] == "http://<redacted>@db:8086"
        assert set(got["sensors"]) == {"battery", "solar", "shore"} and got["sensors"]["battery"]["up"] is True
        assert got["sensors"]["battery"]["values"]["voltage_v"] == poller.states["battery"].last_values["voltage_v"]
        assert httpx.get(out.url + "/healthz").status_code == 200
        healthy.clear()
        r = httpx.get(out.url + "/healthz")
        assert r.status_code == 503 and r.text == "unhealthy\n"
        assert httpx.get(out.url + "/nope").status_code == 404


def test_redact_leaves_everything_else_alone():
    data = {"a": [{"api_key": "k", "n": 1}], "password_file": "", "u": "see http://host/x@y", "t": None}
    assert redact(data) == {"a": [{"api_key": "<redacted>", "n": 1}], "password_file": "", "u": "see http://host/x@y", "t": None}


def test_basic_auth_guards_everything_but_healthz(poller):
    st = settings(username="skipper", password_hash=hash_password("bilge pump", iterations=2000))
    with HttpOutput(st, status=status_of(poller), healthy=lambda: True) as out:
        for path in ("/", "/metrics", "/status", "/state", "/events"):
            r = httpx.get(out.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic realm="), path
        assert httpx.get(out.url + "/healthz").status_code == 200
        t = time.monotonic()
        assert httpx.get(out.url + "/metrics", auth=("skipper", "bilge pumps")).status_code == 401
        assert time.monotonic() - t >= h.FAILED_LOGIN_DELAY_S * 0.9            # a guess costs a second
        assert httpx.get(out.url + "/metrics", auth=("skiper", "bilge pump")).status_code == 401
        assert httpx.get(out.url + "/metrics", auth=("skipper", "bilge pump")).status_code == 200
        assert httpx.get(out.url + "/", auth=("skipper", "bilge pump")).status_code == 200
        t = time.monotonic()
        for _ in range(20):                                                    # a known login is not re-hashed
            assert httpx.get(out.url + "/healthz", auth=("skipper", "bilge pump")).status_code == 200
            assert httpx.get(out.url + "/state", auth=("skipper", "bilge pump")).status_code == 200
        assert time.monotonic() - t < 5


# ------------------------------------------------------------------------------------------------ /metrics

def test_promtool_accepts_the_exposition_without_warnings(poller, sims, tmp_path):
    with HttpOutput(settings(), status=status_of(poller), healthy=lambda: True) as out:
        feed(poller, out)
        sims[0].meter(2).silent = True       # one meter down: dcmon_up 0, its values absent
        feed(poller, out)
        text = httpx.get(out.url + "/metrics").text
    (tmp_path / "metrics.txt").write_text(text)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    assert 'dcmon_up{bus="dc",host="boat",model="pzem017",sensor="solar"} 0.0' in text
    assert 'dcmon_voltage_volts{bus="dc",host="boat",model="pzem017",sensor="battery"}' in text
    assert 'sensor="solar"} ' not in "\n".join(l for l in text.splitlines() if l.startswith(("dcmon_voltage", "dcmon_power_w")))
    for name in ("dcmon_frequency_hertz", "dcmon_power_factor_ratio", "dcmon_energy_joules_total", "dcmon_alarm",
                 "dcmon_polls_total", "dcmon_poll_failures_total", "dcmon_poll_latency_seconds", "dcmon_spool_depth",
                 "dcmon_spool_oldest_age_seconds", "dcmon_spool_dropped_total", "dcmon_bus_up", "process_resident_memory_bytes"):
        assert f"\n{name}{{" in text or f"\n{name} " in text, name
    # promtool can fail: the check is real
    bad = subprocess.run(["promtool", "check", "metrics"], input="# TYPE x_watt_hours counter\nx_watt_hours 1\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_prometheus_scrapes_the_simulator_and_sees_a_meter_go_down(poller, sims, tmp_path):
    st = settings(username="prom", password_hash=hash_password("scrape me", iterations=2000))
    with HttpOutput(st, status=status_of(poller), healthy=lambda: True, host="boat") as out:
        host, port = st.address
        prom = Prometheus(tmp_path / "prom", [f"{host}:{port}"], interval="1s", basic_auth=("prom", "scrape me")).start()
        try:
            for _ in range(3):
                fed = {r.sensor: r for r in feed(poller, out)}
            prom.wait_for('up{job="dcmon"}', lambda res: res and res[0]["value"][1] == "1")

            def value(q):
                res = prom.query(q)
                return float(res[0]["value"][1]) if res else None

            bat, shore = fed["battery"].fields, fed["shore"].fields
            prom.wait_for('dcmon_voltage_volts{sensor="battery"}',
                          lambda res: res and float(res[0]["value"][1]) == bat["voltage_v"])
            got = prom.query('dcmon_voltage_volts{sensor="battery"}')[0]["metric"]
            assert {k: got[k] for k in ("host", "sensor", "bus", "model")} == \
                {"host": "boat", "sensor": "battery", "bus": "dc", "model": "pzem017"}
            assert value('dcmon_current_amperes{sensor="battery"}') == bat["current_a"]
            assert value('dcmon_power_watts{sensor="battery"}') == bat["power_w"]
            assert value('dcmon_energy_joules_total{sensor="battery"}') == bat["energy_wh"] * 3600
            assert value('dcmon_frequency_hertz{sensor="shore"}') == shore["frequency_hz"]
            assert value('dcmon_power_factor_ratio{sensor="shore"}') == shore["power_factor"]
            assert value('dcmon_polls_total{sensor="battery"}') == 3
            assert value('dcmon_spool_depth{output="influxdb"}') == 3
            assert 6 < value('dcmon_spool_oldest_age_seconds{output="influxdb"}') < 60

            sims[0].meter(1).silent = True                       # the battery meter stops answering
            feed(poller, out)
            prom.wait_for('dcmon_up{sensor="battery"}', lambda res: res and res[0]["value"][1] == "0")
            prom.wait_for('dcmon_voltage_volts{sensor="battery"}', lambda res: res == [])      # absent, not stale
            assert prom.query('dcmon_energy_joules_total{sensor="battery"}') == []
            assert value('dcmon_up{sensor="solar"}') == 1 and value('dcmon_voltage_volts{sensor="solar"}') is not None
            assert value('dcmon_poll_failures_total{sensor="battery"}') == 1

            sims[0].meter(1).silent = False                      # and comes back
            feed(poller, out)
            prom.wait_for('dcmon_voltage_volts{sensor="battery"}', lambda res: len(res) == 1)
            assert value('dcmon_up{sensor="battery"}') == 1
        finally:
            prom.stop()


# -------------------------------------------------------------------------------------------- energy today

def test_energy_today_counts_from_local_midnight_and_through_a_reset():
    out = HttpOutput(settings(), status=dict, healthy=lambda: True)
    midnight = time.mktime(time.strptime("2026-03-10 00:00:00", "%Y-%m-%d %H:%M:%S"))

    def put(at_s, wh, reset=False):
        out.on_reading(Reading("dc_power", int((midnight + at_s) * 1e9), {"host": "h", "bus": "a", "model": "pzem017"},
                               {"voltage_v": 13.0, "current_a": 1.0, "power_w": 13.0, "energy_wh": float(wh),
                                "energy_reset": reset}, sensor="bat"))
        return out.snapshot()["meters"][0]

    assert put(-3600, 1000)["today_wh"] == 0
    m = put(-60, 1010)
    assert m["today_wh"] == 10 and m["today_since"] == "23:00"         # since the start, and says so
    m = put(60, 1012)
    assert m["today_wh"] == 0 and m["today_since"] == "midnight"      # a new day
    assert put(120, 1030)["today_wh"] == 18
    assert put(180, 5, reset=True)["today_wh"] == 23                  # the meter's counter was reset: +5 from 0
    assert put(240, 9)["today_wh"] == 27


# ---------------------------------------------------------------------------------- live clients, slow ones

def _sse_reader(url: str, got: list, stop: threading.Event) -> None:
    try:
        with httpx.stream("GET", url, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                if stop.is_set():
                    return
    except httpx.HTTPError:
        pass


def _feed_cost_us(out: HttpOutput, readings: list[Reading], n: int = 3000) -> float:
    """Median µs per on_reading call, in batches of 100."""
    per = []
    for i in range(n // 100):
        t = time.perf_counter()
        for r in readings * (100 // len(readings)):
            out.on_reading(r)
        per.append((time.perf_counter() - t) / (100 // len(readings) * len(readings)) * 1e6)
    return statistics.median(per)


def test_many_live_clients_and_a_stalled_one_do_not_slow_the_feeding_side(poller, monkeypatch):
    monkeypatch.setattr(h, "SSE_WRITE_TIMEOUT_S", 3.0)
    with HttpOutput(settings(), status=status_of(poller), healthy=lambda: True) as out:
        readings = feed(poller, out)
        alone = _feed_cost_us(out, readings)

        stop = threading.Event()
        got: list[list] = [[] for _ in range(50)]
        readers = [threading.Thread(target=_sse_reader, args=(out.url + "/events", g, stop), daemon=True) for g in got]
        for t in readers:
            t.start()
        stalled = socket.create_connection(("127.0.0.1", out.settings.address[1]))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")   # and never reads
        deadline = time.monotonic() + 20
        while out.live_clients < 51 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.live_clients == 51

        busy = _feed_cost_us(out, readings)
        # now fill the stalled client's buffers quickly: snapshots as fast as they come
        monkeypatch.setattr(h, "SNAPSHOT_MIN_INTERVAL_S", 0.01)
        t = time.monotonic()
        while out.live_clients > 50 and time.monotonic() - t < 30:   # feed until the stalled client is dropped
            feed(poller, out)
        monkeypatch.setattr(h, "SNAPSHOT_MIN_INTERVAL_S", 0.25)
        feed(poller, out)
        last_v = poller.states["battery"].last_values["voltage_v"]
        time.sleep(1.0)
        print(f"on_reading: {alone:.2f} µs alone, {busy:.2f} µs with 50 live clients and a stalled one")
        assert busy < max(3 * alone, alone + 20), (alone, busy)   # no per-client work on the feeding side
        assert all(len(g) >= 3 for g in got), [len(g) for g in got]  # every live client got updates
        assert all(any(m["sensor"] == "battery" and m.get("voltage_v") == last_v for m in g[-1]["meters"]) for g in got)
        assert out.live_clients == 50                            # the stalled one was dropped
        stop.set()
        stalled.close()
        t = time.monotonic()
        assert httpx.get(out.url + "/healthz", timeout=5).status_code == 200 and time.monotonic() - t < 1.0


def test_clients_that_vanish_mid_stream_are_forgotten(poller):
    with HttpOutput(settings(), status=status_of(poller), healthy=lambda: True) as out:
        socks = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", out.settings.address[1]))
            s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            socks.append(s)
        for s in socks:                                          # reset, not a clean close
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        deadline = time.monotonic() + 15
        while out.live_clients and time.monotonic() < deadline:
            feed(poller, out)
            time.sleep(0.2)
        assert out.live_clients == 0
        assert httpx.get(out.url + "/state", timeout=5).json()["meters"][0]["sensor"] == "battery"


# ------------------------------------------------------------------------------------------- the page

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium") or "/usr/bin/chromium"
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=412,860", "about:blank"],
            pass_fds=(3, 4, hi_r, hi_w), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(hi_r)
        os.close(hi_w)
        self._id = 0
        self._buf = b""
        self.session = ""

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session or self.session:
            msg["sessionId"] = session or self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            import select
            if select.select([self._r], [], [], 1.0)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            v = self.js(expr)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} still {v!r}; page: {self.js('document.body.innerText')!r}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        try:
            self.session = ""
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


CARD = "document.querySelector('[data-sensor=\"{}\"]')"


def test_the_page_shows_live_values_and_a_meter_going_down(poller, sims, tmp_path):
    with HttpOutput(settings(), status=status_of(poller), healthy=lambda: True) as out:
        fed = {r.sensor: r for r in feed(poller, out)}
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(out.url + "/")
            v = f"{fed['battery'].fields['voltage_v']:.2f}"
            browser.wait(f"{CARD.format('battery')}?.querySelector('.v').textContent === '{v}'")
            assert browser.js("document.getElementById('conn').textContent") == "live"
            assert browser.js(f"{CARD.format('shore')}.querySelector('.ac').textContent").endswith("PF 1.00")
            assert "since" in browser.js(f"{CARD.format('battery')}.querySelector('.since').textContent")
            assert browser.js("document.getElementById('outputs').textContent").startswith("influxdb: 3 queued (oldest")

            sims[0].meter(1).base_voltage_v = 25.6                 # the values change: the page follows, no reload
            updates = browser.js("document.body.dataset.updates")
            fed = {r.sensor: r for r in feed(poller, out)}
            v = f"{fed['battery'].fields['voltage_v']:.2f}"
            assert float(v) > 24
            browser.wait(f"{CARD.format('battery')}.querySelector('.v').textContent === '{v}'")
            assert browser.js("document.body.dataset.updates") != updates

            sims[0].meter(2).silent = True                          # a meter goes down
            feed(poller, out)
            browser.wait(f"{CARD.format('solar')}.dataset.up === '0'")
            assert browser.js(f"{CARD.format('solar')}.querySelector('.badge').textContent") == "DOWN"
            assert browser.js(f"{CARD.format('solar')}.querySelector('.power').textContent") == "– W"
            assert browser.js(f"{CARD.format('battery')}.dataset.up") == "1"
            shot = tmp_path / "http-page.png"
            browser.screenshot(shot)
            print(f"screenshot of the page: {shot}")
            assert shot.stat().st_size > 5000
        finally:
            browser.close()


def test_the_page_falls_back_to_polling_without_server_sent_events(poller, tmp_path):
    """A browser (or proxy) without EventSource: the page polls /state."""
    with HttpOutput(settings(), status=status_of(poller), healthy=lambda: True) as out:
        fed = {r.sensor: r for r in feed(poller, out)}
        page = out.page.replace(b"if (!window.EventSource)", b"if (true)")
        out.page = page
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(out.url + "/")
            v = f"{fed['battery'].fields['voltage_v']:.2f}"
            browser.wait(f"{CARD.format('battery')}?.querySelector('.v').textContent === '{v}'")
            assert browser.js("document.getElementById('conn').textContent") == "polling every 5 s"
            assert out.live_clients == 0
        finally:
            browser.close()


def test_page_off_means_no_page_but_metrics_still_served(poller):
    with HttpOutput(settings(page=False), status=status_of(poller), healthy=lambda: True) as out:
        assert httpx.get(out.url + "/").status_code == 404
        assert httpx.get(out.url + "/metrics").status_code == 200


def test_batteries_in_metrics_known_values_only(poller, tmp_path):
    """status.json's "batteries" (dcmon.battery_service) as gauges: a battery whose state of charge is unknown
    has no state-of-charge series (absent, not 0); promtool accepts the exposition."""
    batteries = {"house": {"soc_pct": 87.5, "time_to_go_s": 5400.0, "current_a": -3.25, "voltage_v": 12.61,
                           "synchronisations": 2, "charged_kwh": 1.25, "discharged_kwh": 0.5,
                           "time_since_full_s": 7200.0},
                 "van": {"soc_pct": None, "time_to_go_s": None, "current_a": 1.5, "voltage_v": 13.1,
                         "synchronisations": 0}}
    with HttpOutput(settings(), status=status_of(poller, batteries=batteries), healthy=lambda: True,
                    host="boat") as out:
        feed(poller, out)
        text = httpx.get(out.url + "/metrics").text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    assert 'dcmon_battery_state_of_charge_ratio{battery="house",host="boat"} 0.875' in text
    assert 'dcmon_battery_time_to_go_seconds{battery="house",host="boat"} 5400.0' in text
    assert 'dcmon_battery_net_current_amperes{battery="house",host="boat"} -3.25' in text
    assert 'dcmon_battery_synchronisations_total{battery="house",host="boat"} 2.0' in text
    assert 'dcmon_battery_net_current_amperes{battery="van",host="boat"} 1.5' in text
    assert 'dcmon_battery_charged_joules_total{battery="house",host="boat"} 4.5e+06' in text
    assert 'dcmon_battery_discharged_joules_total{battery="house",host="boat"} 1.8e+06' in text
    assert 'dcmon_battery_time_since_full_charge_seconds{battery="house",host="boat"} 7200.0' in text
    assert "time_since_full_charge_seconds{battery=\"van\"" not in text      # never charged: absent
    soc = [line for line in text.splitlines() if line.startswith("dcmon_battery_state_of_charge_ratio{")]
    assert soc == ['dcmon_battery_state_of_charge_ratio{battery="house",host="boat"} 0.875'], soc
