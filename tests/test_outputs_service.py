"""The outputs wired into the service, with real parts: the simulator on a pty polled by the real service
(dcmon.service.Service, what `dcmon run` runs, in-process), a real influxd, Debian's mosquitto with an
independent subscriber (mosquitto_sub), Debian's prometheus scraping the running poller.

- a broker outage: InfluxDB keeps receiving everything meanwhile, and afterwards the opt-in stream delivers
  every reading that was spooled for it (the MQTT stream has a spool and a sender of its own);
- an InfluxDB outage: MQTT's states and stream go on at the poll cadence, and InfluxDB gets everything after;
- HTTP: Prometheus scrapes the running service and finds the simulator's values; status.json and /status
  carry each output's backlog;
- stalled HTTP clients do not slow the bus cadence.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from dcmon import config
from dcmon.service import Service, status_path
from dcmon.simulator import Simulator, meters_for
from servers import Mosquitto, Prometheus, free_port
from test_mqtt import Sub

CFG = """
[poller]
interval_s = {interval}
settle_s = 0
health_interval_s = 0
[spool]
path = "{tmp}/spool.sqlite"
[influxdb]
url = "{influx}"
database = "{db}"
timeout_s = 2
[buses.rs485]
port = "{port}"
timeout_s = 0.2
retries = 0
[[sensors]]
name = "battery"
bus = "rs485"
address = 1
[[sensors]]
name = "solar"
bus = "rs485"
address = 2
"""


@pytest.fixture
def meters():
    with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as s:
        yield s


class Running:
    """The service in a thread (as `dcmon run` runs it), stopped and closed by ``stop()``."""

    def __init__(self, cfg: config.Config) -> None:
        self.service = Service(cfg)
        self.stop_event = threading.Event()
        self.service.start_outputs()
        self.thread = threading.Thread(target=self.service.run_forever, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.service.close()


def load(tmp_path: Path, monkeypatch, *, influx: str, db: str, port: str, extra: str = "",
         interval: float = 0.5, env: dict[str, str] | None = None) -> config.Config:
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    p = tmp_path / "config.toml"
    p.write_text(CFG.format(interval=interval, tmp=tmp_path, influx=influx, db=db, port=port) + extra)
    return config.load(p, env=env or {})


def influx_times(influxd, db: str) -> set[tuple[str, int]]:
    out = set()
    for series in influxd.query('SELECT voltage_v, sensor FROM dc_power', db):
        cols = series["columns"]
        for row in series["values"]:
            rec = dict(zip(cols, row))
            out.add((rec["sensor"], int(rec["time"])))
    return out


def stream_times(sub: Sub) -> set[tuple[str, int]]:
    with sub._cv:  # noqa: SLF001 - the collected messages
        msgs = list(sub.msgs)
    return {(json.loads(p)["tags"]["sensor"], json.loads(p)["time_ns"]) for _, t, p in msgs if t.endswith("/reading")}


def wait(pred, timeout: float = 20.0, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def test_broker_outage_influxdb_keeps_everything_and_the_stream_delivers_every_spooled_reading(
        tmp_path, monkeypatch, influxd, fresh_db, meters):
    broker = Mosquitto(tmp_path / "mosq").start()
    extra = f'[mqtt]\nenabled = true\nurl = "{broker.url}"\nstream = true\ntimeout_s = 2\n'
    cfg = load(tmp_path, monkeypatch, influx=influxd.url, db=fresh_db, port=meters.path, extra=extra)
    sub = Sub(broker, "dcmon/+/+/reading", client_id="db-feed", persistent=True)   # a pipeline's session
    run = Running(cfg)
    subs = [sub]
    try:
        mqtt_lane = run.service.lanes[1]
        assert mqtt_lane.output.name == "mqtt" and mqtt_lane.spool.path == tmp_path / "spool-mqtt.sqlite"
        assert wait(lambda: len(stream_times(sub)) >= 4)
        sub.stop()
        broker.stop()                                              # the broker goes away for ~3 s
        t_down = time.monotonic()
        before = len(influx_times(influxd, fresh_db))
        assert wait(lambda: mqtt_lane.spool.stats().depth >= 6)    # the stream's readings wait in its own spool
        # meanwhile InfluxDB gets every reading at the cadence: the other output's outage does not hold it up
        assert wait(lambda: len(influx_times(influxd, fresh_db)) >= before + 6, timeout=5)
        assert run.service.spool.stats().depth <= 4
        assert time.monotonic() - t_down < 8
        rec = run.service.status_record("running")["outputs"]
        assert rec["mqtt"]["connected"] is False and rec["mqtt"]["depth"] >= 6 and rec["mqtt"]["last_error"]
        broker.start()                                             # back (persistent: the session survived)
        sub2 = Sub(broker, "dcmon/+/+/reading", client_id="db-feed", persistent=True)
        subs.append(sub2)
        assert wait(lambda: mqtt_lane.spool.stats().depth == 0, timeout=30)
    finally:
        run.stop()
    try:
        want = influx_times(influxd, fresh_db)
        got: set[tuple[str, int]] = set()
        assert wait(lambda: want <= (got.update(*(stream_times(s) for s in subs)) or got), timeout=10), \
            f"{len(want - got)} of {len(want)} readings never reached the stream"
        assert {s for s, _ in want} == {"battery", "solar"} and len(want) >= 16
        final = json.loads(status_path(cfg).read_text())
        assert final["state"] == "stopped" and final["outputs"]["mqtt"]["depth"] == 0
        assert final["outputs"]["influxdb"]["depth"] == final["spool"]["depth"] == 0
    finally:
        for s in subs:
            s.stop()
        broker.stop()


def test_influxdb_outage_leaves_mqtt_unaffected(tmp_path, monkeypatch, own_influxd, meters):
    own_influxd.create_db("dcmon")
    broker = Mosquitto(tmp_path / "mosq").start()
    sub = Sub(broker, "dcmon/+/+/state", "dcmon/+/+/reading")
    extra = f'[mqtt]\nenabled = true\nurl = "{broker.url}"\nstream = true\n'
    cfg = load(tmp_path, monkeypatch, influx=own_influxd.url, db="dcmon", port=meters.path, extra=extra)
    run = Running(cfg)
    try:
        assert wait(lambda: len(stream_times(sub)) >= 2)
        own_influxd.stop()                                         # InfluxDB goes away
        n0, t0 = len(stream_times(sub)), time.monotonic()
        time.sleep(3.0)
        rate = (len(stream_times(sub)) - n0) / (time.monotonic() - t0)
        assert rate >= 0.8 * 2 / 0.5, rate                         # two meters every 0.5 s, as before
        states = [json.loads(p) for _, p in sub.on("dcmon/" + cfg.host + "/battery/state")]
        assert len(states) >= 6
        assert run.service.lanes[1].spool.stats().depth <= 4       # the stream is not waiting for InfluxDB
        assert run.service.spool.stats().depth >= 8                # InfluxDB's readings wait in its spool
        own_influxd.start()
        assert wait(lambda: run.service.spool.stats().depth == 0, timeout=30)
    finally:
        run.stop()
        sub.stop()
        broker.stop()
    got = influx_times(own_influxd, "dcmon")
    assert stream_times(sub) <= got                                # everything reached InfluxDB after all
    own_influxd.stop()


def test_prometheus_scrapes_the_running_service_and_slow_clients_do_not_slow_the_bus(
        tmp_path, monkeypatch, meters):
    port = free_port()
    extra = f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    cfg = load(tmp_path, monkeypatch, influx="http://127.0.0.1:9", db="dcmon", port=meters.path, extra=extra,
               interval=0.25, env={"DCMON_INFLUXDB_ENABLED": "false"})      # HTTP alone: no InfluxDB at all
    run = Running(cfg)
    prom = Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], interval="1s").start()
    stalled: list[socket.socket] = []
    try:
        states = run.service.poller.states
        assert wait(lambda: states["battery"].polls_ok >= 2)
        v = float(states["battery"].last_values["voltage_v"])
        prom.wait_for('dcmon_voltage_volts{sensor="battery"}',
                      lambda res: res and abs(float(res[0]["value"][1]) - v) < 0.5, timeout=30)
        got = prom.query('dcmon_up{sensor="solar"}')
        assert got and got[0]["value"][1] == "1"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        assert set(st["outputs"]) == {"influxdb", "http"} and st["outputs"]["influxdb"]["sending"] is False

        def cadence(seconds: float) -> float:
            n0, t0 = run.service.poller.cycles, time.monotonic()
            time.sleep(seconds)
            return (run.service.poller.cycles - n0) / (time.monotonic() - t0)

        alone = cadence(2.0)
        for _ in range(20):                                        # clients that ask for the live stream, never read
            c = socket.create_connection(("127.0.0.1", port))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            stalled.append(c)
        busy = cadence(2.0)
        print(f"bus cycles per second: {alone:.2f} alone, {busy:.2f} with 20 stalled clients")
        assert busy >= 0.9 * alone and busy >= 0.9 * 4, (alone, busy)
    finally:
        for c in stalled:
            c.close()
        prom.stop()
        run.stop()


def test_status_shows_each_outputs_backlog_and_warns_on_an_old_stream_backlog(tmp_path, monkeypatch, capsys):
    """`dcmon status`: a line per output; an MQTT stream backlog older than --max-backlog is a WARNING of its own."""
    import os

    from dcmon.cli import main

    now = time.time()
    record = {"time": now, "pid": os.getpid(), "state": "running", "sensors": {}, "buses": {},
              "spool": {"depth": 0}, "influxdb_enabled": True,
              "outputs": {"influxdb": {"depth": 0, "sending": True, "spool": str(tmp_path / "spool.sqlite")},
                          "mqtt": {"connected": False, "depth": 120, "oldest_time_ns": int((now - 1800) * 1e9),
                                   "sending": True, "spool": str(tmp_path / "spool-mqtt.sqlite"),
                                   "last_error": "MQTT broker at mqtt://10.0.0.2:1883: not connected (refused)"}}}
    (tmp_path / "status.json").write_text(json.dumps(record))
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    assert main(["status", "--config", str(tmp_path / "none.toml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DCMON WARNING: 120 reading(s) wait for mqtt in ") and "30 min old" in out
    assert "output mqtt: NOT CONNECTED, 120 queued, 0 dropped, 0 sent (spool-mqtt.sqlite), last error: MQTT" in out
    assert "output influxdb: 0 queued" in out
