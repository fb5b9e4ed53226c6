"""The MQTT output against a real broker: Debian's mosquitto on a free loopback port (servers.Mosquitto),
with a password file and a TLS listener whose CA is made here (openssl). What arrives is checked by an
independent subscriber, mosquitto_sub; the readings come from the simulator on a pty, read with
meter.read_values, as the poller reads them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from servers import Mosquitto, make_ca

from dcmon.bus import Bus, BusSettings
from dcmon.errors import ConfigError, NoResponse, SinkAuth, SinkPermanent, SinkRetryable
from dcmon.meter import read_values
from dcmon.models import PZEM004T, PZEM017
from dcmon.outputs.mqtt import MeterInfo, MqttOutput, MqttSettings, parse_line, slug
from dcmon.reading import Reading, encode_line

HOST = "pi"
METERS = [MeterInfo("battery", PZEM017, "rs485", 1), MeterInfo("solar", PZEM017, "rs485", 2)]
ADDRESS = {"battery": 1, "solar": 2}


# ------------------------------------------------------------------------------------------ helpers

class Sub:
    """mosquitto_sub in the background: every message as (retain flag, topic, payload)."""

    def __init__(self, broker: Mosquitto, *topics: str, client_id: str = "", persistent: bool = False) -> None:
        argv = ["mosquitto_sub", *broker.client_args(), "-F", "%r\t%t\t%p", "-t", "test/ready"]
        for t in topics:
            argv += ["-t", t]
        if persistent:
            argv += ["-c", "-i", client_id, "-q", "1"]
        elif client_id:
            argv += ["-i", client_id]
        self.msgs: list[tuple[int, str, str]] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self._ready(broker)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            r, t, p = line.rstrip("\n").split("\t", 2)
            with self._cv:
                self.msgs.append((int(r), t, p))
                self._cv.notify_all()

    def _ready(self, broker: Mosquitto) -> None:
        """Subscribed: a sentinel published after the start arrives."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", *broker.client_args(), "-t", "test/ready", "-m", "x"], check=True)
            if self.wait(lambda m: any(t == "test/ready" for _, t, _ in m), 0.3):
                return
        raise AssertionError(f"mosquitto_sub did not subscribe: {self.proc.stderr.read() if self.proc.poll() else ''}")

    def wait(self, pred, timeout: float = 10.0):
        with self._cv:
            ok = self._cv.wait_for(lambda: pred(self.msgs), timeout)
            return ok

    def on(self, topic: str) -> list[tuple[int, str]]:
        with self._cv:
            return [(r, p) for r, t, p in self.msgs if t == topic]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def retained(broker: Mosquitto, topic: str) -> dict[str, str]:
    """The retained messages under ``topic`` now (a fresh subscriber, one second)."""
    r = subprocess.run(["mosquitto_sub", *broker.client_args(), "-t", topic, "--retained-only", "-W", "1",
                        "-F", "%t\t%p"], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        t, _, p = line.partition("\t")
        out[t] = p
    return out


def settings(broker: Mosquitto, **kw) -> MqttSettings:
    return MqttSettings.from_dict({"enabled": True, "url": broker.url, **kw}, "config.toml")


def output(broker: Mosquitto, meters=METERS, **kw) -> MqttOutput:
    out = MqttOutput(settings(broker, **kw), host=HOST, meters=meters, reconnect_min_s=1, reconnect_max_s=1).start()
    assert out.wait_connected(10), out.last_error
    return out


def reading(sensor: str, values: dict, time_ns: int | None = None, model=PZEM017) -> Reading:
    """A Reading as the poller makes one (Poller.make_reading): floats, booleans, calibrated, energy_reset."""
    fields = {k: v if isinstance(v, bool) else float(v) for k, v in values.items()}
    fields["calibrated"] = False
    fields["energy_reset"] = False
    tags = {"sensor": sensor, "model": model.name, "address": str(ADDRESS.get(sensor, 1)), "bus": "rs485", "host": HOST}
    return Reading("dc_power" if model.kind == "dc" else "ac_power", time_ns or time.time_ns(), tags, fields, sensor=sensor)


def fake_values(energy: float) -> dict:
    return {"voltage_v": 13.2, "current_a": 2.0, "power_w": 26.4, "energy_wh": energy,
            "high_voltage_alarm": False, "low_voltage_alarm": False}


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def bus(sim):
    with Bus(BusSettings("rs485", sim.path, stopbits=2, timeout_s=0.3, retries=0, gap_s=0.0)) as b:
        yield b


# ------------------------------------------------------------------------------------------ settings

def test_settings_defaults_and_what_is_refused(tmp_path):
    d = MqttSettings.from_dict({}, "config.toml")
    assert (d.enabled, d.url, d.qos, d.topic_prefix, d.discovery, d.discovery_prefix, d.retain_state, d.stream) == \
        (False, "mqtt://localhost:1883", 1, "dcmon", True, "homeassistant", True, False)
    assert MqttSettings.from_dict({"url": "mqtts://broker.lan"}, "c.toml").port == 8883
    # environment values arrive as strings
    e = MqttSettings.from_dict({"enabled": "true", "qos": "0", "stream": "yes", "timeout_s": "2.5"}, "c.toml")
    assert (e.enabled, e.qos, e.stream, e.timeout_s) == (True, 0, True, 2.5)

    def refused(data, key, *words):
        with pytest.raises(ConfigError) as ei:
            MqttSettings.from_dict(data, str(tmp_path / "config.toml"))
        assert ei.value.key == f"mqtt.{key}", str(ei.value)
        for w in words:
            assert w in str(ei.value)
        return str(ei.value)

    refused({"qso": 1}, "qso", "did you mean mqtt.qos")
    text = refused({"url": "mqtt://user:hunter2@broker:1883"}, "url", "mqtt.password_file")
    assert "hunter2" not in text
    refused({"url": "http://broker:1883"}, "url", "mqtt://")
    refused({"url": "mqtt://broker:99999"}, "url", "port")
    refused({"url": "mqtt://broker:1883/x"}, "url")
    refused({"qos": 2}, "qos", "0 or 1")
    refused({"qos": True}, "qos")
    refused({"enabled": "maybe"}, "enabled")
    refused({"topic_prefix": "dcmon/#"}, "topic_prefix")
    refused({"topic_prefix": "/dcmon"}, "topic_prefix")
    refused({"ca_file": "ca.crt"}, "ca_file", "mqtts://")
    refused({"url": "mqtts://b", "ca_file": "missing.crt"}, "ca_file", "does not exist")
    refused({"password": "x"}, "username")
    refused({"username": "u", "password_file": "nope.txt"}, "password_file", "cannot read")
    (tmp_path / "empty.txt").write_text("\n")
    refused({"username": "u", "password_file": "empty.txt"}, "password_file", "empty")

    (tmp_path / "mqtt.pw").write_text("s3cret\nsecond line ignored\n")
    s = MqttSettings.from_dict({"username": "u", "password_file": "mqtt.pw"}, str(tmp_path / "config.toml"))
    assert s.password == "s3cret"
    assert "s3cret" not in repr(s)
    # a password given directly (config.local.toml / DCMON_MQTT_PASSWORD) wins over the file
    assert MqttSettings.from_dict({"username": "u", "password": "direct", "password_file": "mqtt.pw"},
                                  str(tmp_path / "c.toml")).password == "direct"


def test_sensor_names_that_collide_as_topics_are_refused():
    with pytest.raises(ConfigError, match="same MQTT topic"):
        MqttOutput(MqttSettings(), host=HOST, meters=[MeterInfo("bat 1", PZEM017), MeterInfo("bat/1", PZEM017)])
    assert slug("Battery bank #1") == "Battery_bank_1"


def test_parse_line_reads_back_what_the_encoder_writes():
    tags = {"sensor": "bat, 1=x", "host": "pi", "bus": "rs485"}
    fields = {"voltage_v": 13.25, "energy_wh": 1234.0, "low_voltage_alarm": True, "n": 3, "note": 'a "q" \\ b'}
    line = encode_line("dc power", tags, fields, 1_700_000_000_123_456_789)
    r = parse_line(line)
    assert (r.measurement, r.tags, r.fields, r.time_ns, r.sensor) == \
        ("dc power", tags, fields, 1_700_000_000_123_456_789, "bat, 1=x")
    for bad in ("", "dc_power", "dc_power,sensor=a", "dc_power,sensor=a voltage_v=1", "dc_power x 1", 'm f="open 1'):
        with pytest.raises(ValueError):
            parse_line(bad)


# ------------------------------------------------------------------------------------------ discovery and state

def test_discovery_payloads_and_state_equal_what_the_simulator_serves(broker, sim, bus):
    sub = Sub(broker, "homeassistant/#", "dcmon/#")
    out = output(broker)
    try:
        values = {name: read_values(bus, PZEM017, a) for name, a in ADDRESS.items()}
        readings = {name: reading(name, v) for name, v in values.items()}
        for r in readings.values():
            out.publish_state(r)
        assert sub.wait(lambda m: all(any(t == f"dcmon/pi/{s}/state" for _, t, _ in m) for s in ADDRESS))
    finally:
        out.close()
        sub.stop()

    configs = {t: json.loads(p) for r, t, p in sub.msgs if t.startswith("homeassistant/") and p}
    expected = {"voltage_v": ("sensor", "voltage", "measurement", "V"),
                "current_a": ("sensor", "current", "measurement", "A"),
                "power_w": ("sensor", "power", "measurement", "W"),
                "energy_wh": ("sensor", "energy", "total_increasing", "Wh"),
                "high_voltage_alarm": ("binary_sensor", "problem", None, None),
                "low_voltage_alarm": ("binary_sensor", "problem", None, None)}
    poller = configs.pop("homeassistant/binary_sensor/dcmon_pi/poller/config")
    assert poller["device_class"] == "connectivity" and poller["state_topic"] == "dcmon/pi/status"
    assert (poller["payload_on"], poller["payload_off"]) == ("online", "offline")
    assert len(configs) == len(expected) * 2
    uids = set()
    for sensor in ADDRESS:
        for f, (component, dclass, sclass, unit) in expected.items():
            c = configs[f"homeassistant/{component}/dcmon_pi/{sensor}_{f}/config"]
            uids.add(c["unique_id"])
            assert c["device_class"] == dclass, f
            assert c.get("state_class") == sclass, f
            assert c.get("unit_of_measurement") == unit, f
            assert c["state_topic"] == f"dcmon/pi/{sensor}/state"
            assert f in c["value_template"]
            assert c["availability_mode"] == "all"
            assert [a["topic"] for a in c["availability"]] == ["dcmon/pi/status", f"dcmon/pi/{sensor}/availability"]
            assert all((a["payload_available"], a["payload_not_available"]) == ("online", "offline")
                       for a in c["availability"])
            dev = c["device"]
            assert dev["identifiers"] == [f"dcmon_pi_{sensor}"] and dev["name"] == sensor
            assert (dev["manufacturer"], dev["model"]) == ("Peacefair", "PZEM-017")
            assert dev["via_device"] in poller["device"]["identifiers"]
            if component == "binary_sensor":
                assert (c["payload_on"], c["payload_off"]) == ("ON", "OFF")
    assert len(uids) == len(expected) * 2   # unique per entity

    for sensor, v in values.items():
        r, payload = sub.on(f"dcmon/pi/{sensor}/state")[-1]
        state = json.loads(payload)
        for k, x in v.items():
            assert state[k] == x and type(state[k]) is type(x), (k, state[k], x)   # alarms stay booleans
        assert state["calibrated"] is False and state["energy_reset"] is False
        t = datetime.fromisoformat(state["time"])
        assert t.utcoffset() is not None
        assert abs(t.timestamp() * 1e9 - readings[sensor].time_ns) < 1e6
        assert sub.on(f"dcmon/pi/{sensor}/availability")[-1][1] == "online"
    assert sub.on("dcmon/pi/status")[0][1] == "online"
    assert sub.on("dcmon/pi/status")[-1][1] == "offline"   # close() is a clean offline


def test_ac_meter_entities(broker):
    sub = Sub(broker, "homeassistant/#")
    out = output(broker, meters=[MeterInfo("house", PZEM004T, "ac", 3)])
    out.close()
    sub.stop()
    cfg = {t.split("/")[3]: json.loads(p) for _, t, p in sub.msgs if t.startswith("homeassistant/")}
    assert (cfg["house_frequency_hz"]["device_class"], cfg["house_frequency_hz"]["unit_of_measurement"]) == ("frequency", "Hz")
    assert cfg["house_power_factor"]["device_class"] == "power_factor" and "unit_of_measurement" not in cfg["house_power_factor"]
    assert cfg["house_power_alarm"]["device_class"] == "problem"
    assert cfg["house_energy_wh"]["state_class"] == "total_increasing"


def test_meter_going_silent_turns_its_availability_offline(broker, sim, bus):
    sub = Sub(broker, "dcmon/#")
    out = output(broker)
    try:
        for name, a in ADDRESS.items():
            out.publish_state(reading(name, read_values(bus, PZEM017, a)))
        assert sub.wait(lambda m: any(t == "dcmon/pi/solar/availability" and p == "online" for _, t, p in m))
        sim.meter(2).silent = True
        with pytest.raises(NoResponse):
            read_values(bus, PZEM017, 2)
        out.meter_down("solar")   # what the poller does when a meter stops answering
        assert sub.wait(lambda m: sub.on("dcmon/pi/solar/availability")[-1][1] == "offline")
        assert retained(broker, "dcmon/pi/+/availability") == {"dcmon/pi/battery/availability": "online",
                                                               "dcmon/pi/solar/availability": "offline"}
        sim.meter(2).silent = False
        out.publish_state(reading("solar", read_values(bus, PZEM017, 2)))   # it answers again
        assert sub.wait(lambda m: sub.on("dcmon/pi/solar/availability")[-1][1] == "online")
        assert out.status()["meters_offline"] == []
    finally:
        out.close()
        sub.stop()


CHILD = r"""
import sys, time
from dcmon.models import PZEM017
from dcmon.outputs.mqtt import MeterInfo, MqttOutput, MqttSettings
s = MqttSettings.from_dict({"enabled": True, "url": sys.argv[1]}, "child.toml")
out = MqttOutput(s, host="pi", meters=[MeterInfo("battery", PZEM017)]).start()
assert out.wait_connected(10), out.last_error
out.meter_up("battery")
print("ready", flush=True)
time.sleep(120)
"""


def test_last_will_says_offline_when_the_process_is_killed(broker):
    sub = Sub(broker, "dcmon/pi/status")
    child = subprocess.Popen([sys.executable, "-c", CHILD, broker.url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert sub.wait(lambda m: [p for _, t, p in m if t == "dcmon/pi/status"] == ["online"])
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=5)
        assert sub.wait(lambda m: sub.on("dcmon/pi/status")[-1][1] == "offline", 5)
        assert retained(broker, "dcmon/pi/status") == {"dcmon/pi/status": "offline"}
    finally:
        if child.poll() is None:
            child.kill()
        sub.stop()


def test_a_host_name_with_topic_wildcards_still_announces_and_flushes(broker):
    """host = "pi #2" is a valid host tag; '#' and '+' are MQTT wildcards, so every topic uses its slug (the
    barrier subscription once used the raw name: paho refused it, nothing was announced, flush always failed)"""
    sub = Sub(broker, "homeassistant/#", "dcmon/#")
    out = MqttOutput(settings(broker), host="pi #2+", meters=METERS, reconnect_min_s=1, reconnect_max_s=1).start()
    try:
        assert out.wait_connected(10), out.last_error
        assert "#" not in out.base and "+" not in out.base, out.base
        out.publish_state(reading("battery", fake_values(10.0)))
        assert out.flush(10)
        assert sub.wait(lambda m: sum(t.startswith("homeassistant/sensor/") for _, t, _ in m) == 4 * 2)
        assert sub.wait(lambda m: len(sub.on(out.topic("battery", "state"))) == 1)
    finally:
        out.close()
        sub.stop()


def test_birth_message_re_announces_but_a_stored_one_does_not(broker):
    sub = Sub(broker, "homeassistant/sensor/#", "dcmon/pi/+/state")
    out = output(broker)
    try:
        out.publish_state(reading("battery", fake_values(10.0)))
        n = 4 * 2  # sensor entities of two PZEM-017
        assert sub.wait(lambda m: sum(t.startswith("homeassistant/sensor/") for _, t, _ in m) == n)
        assert sub.wait(lambda m: len(sub.on("dcmon/pi/battery/state")) == 1)
        # Home Assistant restarts: its birth message (live, and here retained too, as some setups do)
        subprocess.run(["mosquitto_pub", *broker.client_args(), "-t", "homeassistant/status", "-m", "online", "-r"],
                       check=True)
        assert sub.wait(lambda m: sum(t.startswith("homeassistant/sensor/") for _, t, _ in m) == 2 * n)
        assert sub.wait(lambda m: len(sub.on("dcmon/pi/battery/state")) == 2)   # and the newest state again
    finally:
        out.close()
    # a new start finds the stored birth message: one announcement, not two
    out = output(broker)
    try:
        assert sub.wait(lambda m: sum(t.startswith("homeassistant/sensor/") for _, t, _ in m) == 3 * n)
        time.sleep(1.0)
        assert sum(t.startswith("homeassistant/sensor/") for _, t, _ in sub.msgs) == 3 * n
        assert out.announcements == 1
    finally:
        out.close()
        sub.stop()


def test_a_meter_that_left_the_config_has_its_entities_removed(broker):
    out = output(broker)
    values = {"voltage_v": 12.5, "current_a": 1.0, "power_w": 12.5, "energy_wh": 10.0}
    for name in ("battery", "solar"):
        out.publish_state(reading(name, values))
    assert out.flush(10)
    out.close()
    before = retained(broker, "homeassistant/#")
    assert sum("/solar_" in t for t in before) == 6 and sum("/battery_" in t for t in before) == 6
    kept = retained(broker, f"dcmon/{HOST}/#")
    assert {f"dcmon/{HOST}/solar/state", f"dcmon/{HOST}/solar/availability",
            f"dcmon/{HOST}/battery/state"} <= set(kept)

    sub = Sub(broker, "homeassistant/#")
    out = output(broker, meters=METERS[:1])   # solar removed from the config
    try:
        assert sub.wait(lambda m: sum("/solar_" in t and p == "" for _, t, p in m) == 6)
        after = retained(broker, "homeassistant/#")
        assert not [t for t in after if "/solar_" in t]
        assert sum("/battery_" in t for t in after) == 6 and any(t.endswith("/poller/config") for t in after)
        assert out.status()["entities_removed"] == 6
        # nothing of the removed meter is left on the broker: its retained state and availability go too,
        # the other meter's and the poller's stay
        deadline = time.monotonic() + 10
        while f"dcmon/{HOST}/solar/state" in retained(broker, f"dcmon/{HOST}/#") and time.monotonic() < deadline:
            time.sleep(0.1)
        left = retained(broker, f"dcmon/{HOST}/#")
        assert not [t for t in left if t.startswith(f"dcmon/{HOST}/solar/")], left
        assert f"dcmon/{HOST}/battery/state" in left and f"dcmon/{HOST}/status" in left
    finally:
        out.close()
        sub.stop()
    out = output(broker, discovery=False)   # discovery turned off: every entity of ours goes
    try:
        deadline = time.monotonic() + 10
        while retained(broker, "homeassistant/#") and time.monotonic() < deadline:
            pass
        assert retained(broker, "homeassistant/#") == {}
    finally:
        out.close()


# ------------------------------------------------------------------------------------------ outages

def test_after_a_broker_outage_only_the_newest_state_goes_out(broker):
    sub = Sub(broker, "dcmon/pi/+/state", client_id="ha-like", persistent=True)
    out = output(broker)
    try:
        t0 = time.time_ns()
        out.publish_state(reading("battery", fake_values(100.0), t0))
        assert sub.wait(lambda m: len(sub.on("dcmon/pi/battery/state")) == 1)
        sub.stop()
        broker.stop()
        deadline = time.monotonic() + 10
        while out.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not out.connected
        for i in range(1, 6):
            out.publish_state(reading("battery", fake_values(100.0 + i), t0 + i * 1_000_000_000))
        broker.start()
        sub = Sub(broker, "dcmon/pi/+/state", client_id="ha-like", persistent=True)
        assert sub.wait(lambda m: any(json.loads(p)["energy_wh"] == 105.0 for _, t, p in m if t.endswith("/state")), 15)
        time.sleep(1.0)
        live = [json.loads(p)["energy_wh"] for r, p in sub.on("dcmon/pi/battery/state") if r == 0]
        assert live == [105.0]   # not 101..104: Home Assistant gets the present, not a replay
        assert out.status()["states_coalesced"] == 4
    finally:
        out.close()
        sub.stop()


def _stream_lines(start: int, n: int, t0: int) -> list[str]:
    return [reading("battery", fake_values(float(i)), t0 + i * 1_000_000).to_line() for i in range(start, start + n)]


def test_stream_delivers_every_reading_in_order_across_a_broker_restart(broker):
    sub = Sub(broker, "dcmon/pi/+/reading", client_id="db-feed", persistent=True)
    out = output(broker, stream=True, timeout_s=2)
    t0 = time.time_ns()
    try:
        out.send_batch(_stream_lines(0, 10, t0) + ["dcmon_health,host=pi,sensor=battery polls_ok=1i 1"])
        sub.stop()
        broker.stop()
        batch = _stream_lines(10, 10, t0)
        started = time.monotonic()
        with pytest.raises(SinkRetryable):
            while True:          # until paho has noticed that the broker is gone
                out.send_batch(batch)
        assert time.monotonic() - started < 5
        broker.start()
        deadline = time.monotonic() + 20
        while True:              # what the sender does: the same batch again, with back-off
            try:
                out.send_batch(batch)
                break
            except SinkRetryable:
                assert time.monotonic() < deadline, out.last_error
                time.sleep(0.2)
        out.send_batch(_stream_lines(20, 10, t0))
        with pytest.raises(SinkPermanent) as ei:
            out.send_batch(_stream_lines(30, 1, t0) + ["not line protocol"])
        assert ei.value.bad_lines == [1]   # nothing of that batch went: the sender quarantines, then re-sends
        before = sub.on("dcmon/pi/battery/reading")   # what arrived before the restart
        sub = Sub(broker, "dcmon/pi/+/reading", client_id="db-feed", persistent=True)
        assert sub.wait(lambda m: len({json.loads(p)["time_ns"] for _, t, p in m if t.endswith("/reading")}) >= 20, 15), \
            (len(before), [json.loads(p)["energy_wh"] for _, t, p in sub.msgs if t.endswith("/reading")])
    finally:
        out.close()
        sub.stop()
    got = [json.loads(p) for _, p in before + sub.on("dcmon/pi/battery/reading")]
    first: list[int] = []
    for g in got:
        if g["time_ns"] not in first:
            first.append(g["time_ns"])
    assert first == [t0 + i * 1_000_000 for i in range(30)]   # every one, the first copies in order
    assert got[0]["energy_wh"] == 0.0 and got[0]["tags"]["sensor"] == "battery"
    assert datetime.fromisoformat(got[0]["time"]).utcoffset() is not None


def test_stream_is_driven_by_the_sender_from_a_spool(broker, tmp_path):
    """The contract the lead wires: Sender(spool, output) drains a spool into the stream (``write``)."""
    from dcmon.sender import Sender
    from dcmon.spool import Spool

    sub = Sub(broker, "dcmon/pi/+/reading")
    out = output(broker, stream=True)
    sp = Spool.open(tmp_path / "mqtt.sqlite", max_bytes=64 << 20, max_age_s=86400)
    try:
        sp.put(_stream_lines(0, 250, time.time_ns()))
        assert Sender(sp, out, batch_lines=100).flush(20)   # type: ignore[arg-type]
        assert sp.stats().depth == 0
        assert sub.wait(lambda m: len(sub.on("dcmon/pi/battery/reading")) == 250)
        assert out.stream_sent == 250
    finally:
        sp.close()
        out.close()
        sub.stop()


# ------------------------------------------------------------------------------------------ TLS and passwords

def test_password_and_tls(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    ca = make_ca(tmp_path / "ca")
    secret = "c0rrect-horse"
    broker = Mosquitto(tmp_path / "mosquitto", users={"dcmon": secret}, tls=ca).start()
    (tmp_path / "mqtt.pw").write_text(secret + "\n")
    tls_url = f"mqtts://localhost:{broker.tls_port}"
    sub = Sub(broker, "dcmon/pi/+/state")
    outs = []

    def start(**kw) -> MqttOutput:
        s = MqttSettings.from_dict({"enabled": True, **kw}, str(tmp_path / "config.toml"))
        o = MqttOutput(s, host=HOST, meters=METERS, reconnect_min_s=1, reconnect_max_s=1).start()
        outs.append(o)
        return o

    try:
        good = start(url=tls_url, username="dcmon", password_file="mqtt.pw", ca_file=str(ca["ca"]))
        assert good.wait_connected(10), good.last_error
        good.publish_state(reading("battery", fake_values(1.0)))
        assert sub.wait(lambda m: len(sub.on("dcmon/pi/battery/state")) == 1)

        wrong = start(url=broker.url, username="dcmon", password="wrong-pw", client_id="t-wrong")
        anonymous = start(url=broker.url, client_id="t-anon")
        untrusted = start(url=tls_url, username="dcmon", password=secret, client_id="t-ca")
        deadline = time.monotonic() + 15
        while any(o.last_error == "not connected yet" for o in (wrong, anonymous, untrusted)):
            assert time.monotonic() < deadline, [o.last_error for o in (wrong, anonymous, untrusted)]
            time.sleep(0.1)
        for o in (wrong, anonymous):
            assert not o.connected
            with pytest.raises(SinkAuth) as ei:
                o.send_batch(_stream_lines(0, 1, time.time_ns()))
            assert "mqtt.password_file" in str(ei.value)
        assert not untrusted.connected
        with pytest.raises(SinkRetryable) as ei:
            untrusted.send_batch(_stream_lines(0, 1, time.time_ns()))
        assert "certificate" in str(ei.value) and "mqtt.ca_file" in str(ei.value)
    finally:
        for o in outs:
            o.close(timeout_s=2)
        sub.stop()
        broker.stop()
    assert "refused the connection" in caplog.text
    assert secret not in caplog.text and "wrong-pw" not in caplog.text
