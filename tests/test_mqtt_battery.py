"""Battery monitors over MQTT and Home Assistant discovery, against a real broker (Debian's mosquitto on a free
loopback port) with mosquitto_sub as the independent subscriber.

The states come from the real chain the service runs: two simulated PZEM-017s on a pty driven by
dcmon.battery_sim's battery model (sped up, as in tests/test_battery_service.py), read by the real Poller,
fed to a real BatteryService whose ``on_state`` is the MQTT output's ``on_battery``. The discovery payloads
are checked against Home Assistant's own tables (device class → units and state classes, copied below from
home-assistant/core, homeassistant/components/sensor/const.py) and the rules of its MQTT sensor schema
(homeassistant/components/mqtt/sensor.py), and their value templates are rendered with Jinja2, as Home
Assistant renders them: a JSON null must come out as "None", which its MQTT sensor shows as "unknown".
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from servers import Mosquitto, free_port
from test_mqtt import Sub, retained

from dcmon import config
from dcmon.battery import BatteryMonitor, BatterySettings
from dcmon.battery_service import BatteryService
from dcmon.battery_sim import BatteryModel
from dcmon.errors import ConfigError
from dcmon.models import PZEM017
from dcmon.outputs.mqtt import (BATTERY_ENTITIES, BATTERY_KEYS, BatteryInfo, MeterInfo, MqttOutput, MqttService,
                                MqttSettings)
from dcmon.poller import Poller
from dcmon.simulator import SimMeter, Simulator

from battery_rig import SPEED, ModelClock, config_text, meters, no_rise_limit  # noqa: F401 - a fixture

HOST = "pi"
SENSOR_NAMED_BATTERY = """[[sensors]]
name = "battery"      # a sensor named like the battery topics' level: must not collide with them
bus = "a"
address = 3
"""

# Home Assistant's DEVICE_CLASS_UNITS and DEVICE_CLASS_STATE_CLASSES for the device classes used here
# (home-assistant/core, homeassistant/components/sensor/const.py); None: no device class (any unit).
HA_UNITS = {"battery": {"%"}, "duration": {"d", "h", "min", "s", "ms"}, "current": {"A", "mA"},
            "voltage": {"V", "mV", "µV", "kV", "MV"}, "power": {"mW", "W", "kW", "MW", "GW", "TW", "BTU/h"},
            "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
            "enum": {None}}
HA_STATE_CLASSES = {"battery": {"measurement"}, "duration": {"measurement", "total", "total_increasing"},
                    "current": {"measurement"}, "voltage": {"measurement"}, "power": {"measurement"},
                    "energy": {"total", "total_increasing"}, "enum": set()}
# The keys Home Assistant's MQTT sensor discovery schema knows (it drops any other silently)
HA_SENSOR_KEYS = {"name", "unique_id", "state_topic", "value_template", "availability", "availability_mode", "qos",
                  "device", "origin", "device_class", "state_class", "unit_of_measurement",
                  "suggested_display_precision", "options", "json_attributes_topic", "json_attributes_template",
                  "entity_category", "expire_after", "force_update", "icon", "enabled_by_default", "encoding"}



def render(template: str, payload: str) -> str:
    """A value template as Home Assistant's MQTT entities render it: value_json from the payload, the output
    as a stripped string ("None" = unknown)."""
    env = ImmutableSandboxedEnvironment()
    return env.from_string(template).render(value=payload, value_json=json.loads(payload)).strip()


class Rig:
    """Battery model → simulator (pty) → Poller → BatteryService → MqttService, as `dcmon run` wires them."""

    def __init__(self, tmp: Path, broker: Mosquitto, model: BatteryModel, **mqtt_kw) -> None:
        self.model = model
        self.clock = ModelClock()   # the model's time 0 (it runs SPEED times faster), and the monitor's clock
        self.sim = Simulator(meters(model, self.clock) + [SimMeter(model=PZEM017, address=3, steady=True)]).start()
        text = config_text(port=self.sim.path, spool=tmp / "spool.sqlite", host=HOST, influxdb="enabled = false",
                           sensors=SENSOR_NAMED_BATTERY, extra=f'[mqtt]\nenabled = true\nurl = "{broker.url}"\n')
        for k, v in mqtt_kw.items():
            text += f"{k} = {json.dumps(v)}\n"
        (tmp / "config.toml").write_text(text)
        self.cfg = config.load(tmp / "config.toml", env={})
        assert self.cfg.mqtt.settings is not None
        self.mqtt = MqttService(self.cfg, self.cfg.mqtt.settings)
        self.mqtt.output._client.reconnect_delay_set(1, 1)
        self.states: list = []

        def on_state(st) -> None:
            self.states.append(st)
            self.mqtt.on_battery(st)

        svc = BatteryService.from_config(self.cfg, mono=self.now, on_state=on_state)
        assert svc is not None
        self.svc = svc
        self.poller = Poller(self.cfg, put=lambda lines: None, on_reading=self.mqtt.on_reading,
                             on_meter_state=lambda st, up: self.mqtt.meter_state(st.name, up, {}),
                             extra_lines=self.svc.on_readings)
        self.mqtt.start()
        assert self.mqtt.output.wait_connected(10), self.mqtt.output.last_error

    def cycle(self) -> None:
        self.poller.poll_bus_once("a")

    def now(self) -> float:
        """The model's (and the monitor's) time now, s."""
        return self.clock(time.monotonic())

    def close(self) -> None:
        self.mqtt.close()
        self.svc.close()
        self.poller.close()
        self.sim.stop()


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def battery_states(sub: Sub, name: str = "house") -> list[dict]:
    return [json.loads(p) for _, p in sub.on(f"dcmon/{HOST}/battery/{name}/state")]


# ------------------------------------------------------------------------------------------ the tests

def test_states_equal_the_battery_service_null_before_the_first_sync_numbers_after(tmp_path, broker, no_rise_limit):
    sub = Sub(broker, "dcmon/#", "homeassistant/#")
    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)
    rig = Rig(tmp_path, broker, model)
    try:
        rig.cycle()
        assert sub.wait(lambda m: any(t.endswith("/battery/house/state") for _, t, _ in m))
        first = battery_states(sub)[0]
        start = rig.now()
        while rig.svc.status()["house"]["soc_pct"] is None:           # charge until it synchronises
            rig.cycle()
            assert rig.now() - start < 3 * 3600, "never synchronised"
        with model.lock:
            model.charger_max_a, model.load_a = 0.0, 1.0               # then discharge at 1 A
        end = rig.now() + 600
        while rig.now() < end:
            rig.cycle()
        assert rig.mqtt.output.flush(10)
        status = rig.svc.status()["house"]
        sent = rig.mqtt.output.battery_states_sent
        # the broker has them all; the independent subscriber gets the last a moment later
        assert sub.wait(lambda m: sum(t == f"dcmon/{HOST}/battery/house/state" for _, t, _ in m) >= sent)
    finally:
        rig.close()
        sub.stop()

    # before the first synchronisation: every key there, the unknown ones null (never 0)
    assert set(BATTERY_KEYS) <= set(first)
    assert first["soc_pct"] is None and first["soc_known"] is False and first["consumed_ah"] is None
    assert first["time_to_go_s"] is None and first["unknown_reason"] == "not synchronised yet"
    assert first["status"] == "charging" and first["net_current_a"] == pytest.approx(1.2, abs=0.05)
    states = battery_states(sub)
    assert len(states) == sent >= 5                          # one per cycle (none coalesced away here)
    known = [s for s in states if s["soc_known"]]
    assert known and all(isinstance(s["soc_pct"], (int, float)) for s in known)
    assert all(s["soc_pct"] is None for s in states[:states.index(known[0])])
    assert known[0]["soc_pct"] == pytest.approx(100.0, abs=0.5) and known[0]["synchronisations"] == 1
    # the last message is the BatteryService's own state for the same readings (as rounded for InfluxDB)
    last = states[-1]
    for k in ("soc_pct", "time_to_go_s", "voltage_v", "consumed_ah", "full_cycles", "time_since_full_s",
              "min_voltage_v", "max_voltage_v"):
        assert last[k] == pytest.approx(status[k], abs=0.051 if k.endswith("_s") else 1e-3), k   # InfluxDB's decimals
    for k in ("charged_ah", "discharged_ah", "charged_kwh", "discharged_kwh"):   # as InfluxDB's decimals
        assert last[k] == pytest.approx(status[k], abs=1e-5), k
    assert last["net_current_a"] == pytest.approx(status["current_a"], abs=1e-3) == pytest.approx(-1.0, abs=0.05)
    assert last["net_power_w"] == pytest.approx(status["power_w"], abs=1e-2)
    assert (last["status"], last["synchronisations"], last["unknown_reason"]) == ("discharging", 1, None)
    assert last["time_to_go_s"] > 0 and last["stale_sensors"] == []
    assert last["last_full"] is not None and last["last_full"].endswith("+00:00")
    # the history counters Home Assistant reads as total_increasing never go down
    for k in ("charged_kwh", "discharged_kwh", "charged_ah", "discharged_ah"):
        values = [s[k] for s in states]
        assert all(b >= a for a, b in zip(values, values[1:])), k
    # the sensor named "battery" kept its own topics: a meter state, not a battery's
    meter = [json.loads(p) for _, p in sub.on(f"dcmon/{HOST}/battery/state")]
    assert meter and all("voltage_v" in m and "soc_pct" not in m for m in meter)
    # Home Assistant's view of the same messages: "None" (unknown) before, numbers after
    configs = {t: json.loads(p) for _, t, p in sub.msgs if t.startswith("homeassistant/") and "/_battery_" in t and p}
    tpl = {k: configs[f"homeassistant/sensor/dcmon_{HOST}/_battery_house_{k}/config"]["value_template"]
           for k in BATTERY_ENTITIES}
    raw = [p for _, p in sub.on(f"dcmon/{HOST}/battery/house/state")]
    assert render(tpl["soc"], raw[0]) == "None" and render(tpl["time_to_go"], raw[0]) == "None"
    assert render(tpl["consumed"], raw[0]) == "None" and render(tpl["status"], raw[0]) == "charging"
    assert float(render(tpl["soc"], raw[-1])) == pytest.approx(status["soc_pct"], abs=1e-3)
    assert float(render(tpl["time_to_go"], raw[-1])) == pytest.approx(status["time_to_go_s"] / 3600, abs=1e-3)
    assert float(render(tpl["charged_energy"], raw[-1])) == pytest.approx(status["charged_kwh"], abs=1e-6)
    assert render(tpl["status"], raw[-1]) == "discharging"
    assert render(tpl["status"], json.dumps({**json.loads(raw[-1]), "status": "unknown"})) == "None"
    assert json.loads(render(configs[f"homeassistant/sensor/dcmon_{HOST}/_battery_house_soc/config"]
                             ["json_attributes_template"], raw[0])) == \
        {"unknown_reason": "not synchronised yet", "stale_sensors": []}


def test_discovery_a_device_per_battery_with_pairs_home_assistant_accepts(tmp_path, broker):
    meters = [MeterInfo(n, PZEM017, "a", i) for i, n in enumerate(("charger", "loads", "battery", "house"), 1)]
    batteries = [BatteryInfo("house", ("charger", "loads"), "battery monitor (LiFePO4, 200 Ah, 24 V)"),
                 BatteryInfo("battery", ("battery",))]     # a battery named like a sensor, and like the level
    sub = Sub(broker, "homeassistant/#")
    out = MqttOutput(MqttSettings.from_dict({"enabled": True, "url": broker.url}, "config.toml"), host=HOST,
                     meters=meters, batteries=batteries).start()
    try:
        assert out.flush(10)
        # the broker has them all; the independent subscriber gets them a moment later
        assert sub.wait(lambda m: sum("/_battery_" in t and bool(p) for _, t, p in m) >= 2 * len(BATTERY_ENTITIES))
    finally:
        out.close()
        sub.stop()
    configs = {t: json.loads(p) for _, t, p in sub.msgs if t.startswith("homeassistant/") and p}
    ours = {t: c for t, c in configs.items() if "/_battery_" in t}
    assert len(ours) == 2 * len(BATTERY_ENTITIES)
    meter_uids = {c["unique_id"] for t, c in configs.items() if t not in ours}
    uids = [c["unique_id"] for c in ours.values()]
    assert len(set(uids)) == len(uids) and not set(uids) & meter_uids
    poller = configs[f"homeassistant/binary_sensor/dcmon_{HOST}/poller/config"]["device"]["identifiers"][0]
    for name in ("house", "battery"):
        entities = {t.rsplit("/", 2)[-2]: c for t, c in ours.items() if f"/_battery_{name}_" in t}
        assert len(entities) == len(BATTERY_ENTITIES)
        devices = {json.dumps(c["device"], sort_keys=True) for c in entities.values()}
        assert len(devices) == 1                                      # one device per battery
        dev = json.loads(devices.pop())
        assert dev["name"] == name and dev["via_device"] == poller and dev["manufacturer"] == "dcmon"
        assert dev["identifiers"] != [f"dcmon_{HOST}_{name}"]          # not the meter "house"'s device
        for c in entities.values():
            assert set(c) <= HA_SENSOR_KEYS, set(c) - HA_SENSOR_KEYS
            assert c["state_topic"] == f"dcmon/{HOST}/battery/{name}/state"
            assert [a["topic"] for a in c["availability"]] == [f"dcmon/{HOST}/status",
                                                               f"dcmon/{HOST}/battery/{name}/availability"]
            assert c["availability_mode"] == "all"
            dclass, sclass, unit = c.get("device_class"), c.get("state_class"), c.get("unit_of_measurement")
            if dclass is not None:
                assert unit in HA_UNITS[dclass], (c["name"], dclass, unit)
                assert (sclass is None) if not HA_STATE_CLASSES[dclass] else sclass in HA_STATE_CLASSES[dclass], \
                    (c["name"], dclass, sclass)
            if "options" in c:   # Home Assistant's rule for enum sensors
                assert dclass == "enum" and not sclass and not unit and c["options"]
    house = {t.rsplit("/", 2)[-2].removeprefix("_battery_house_"): c for t, c in ours.items()
             if "/_battery_house_" in t}
    want = {"soc": ("battery", "measurement", "%"), "time_to_go": ("duration", "measurement", "h"),
            "net_current": ("current", "measurement", "A"), "voltage": ("voltage", "measurement", "V"),
            "net_power": ("power", "measurement", "W"), "consumed": (None, "measurement", "Ah"),
            "charged_energy": ("energy", "total_increasing", "kWh"),
            "discharged_energy": ("energy", "total_increasing", "kWh"), "status": ("enum", None, None),
            "synchronisations": (None, "total_increasing", None),
            "time_since_full": ("duration", "measurement", "h")}
    assert {k: (c.get("device_class"), c.get("state_class"), c.get("unit_of_measurement"))
            for k, c in house.items()} == want
    assert house["status"]["options"] == ["charging", "discharging", "idle"]
    assert house["soc"]["device"]["model"] == "battery monitor (LiFePO4, 200 Ah, 24 V)"


def test_battery_names_that_collide_as_topics_are_refused(broker):
    s = MqttSettings.from_dict({"enabled": True, "url": broker.url}, "config.toml")
    with pytest.raises(ConfigError, match="battery names 'a b' and 'a_b' give the same MQTT topic"):
        MqttOutput(s, host=HOST, meters=[], batteries=[BatteryInfo("a b"), BatteryInfo("a_b")])


def test_unavailable_while_a_meter_is_stale_or_down_and_when_the_poller_stops(tmp_path, broker, no_rise_limit):
    sub = Sub(broker, f"dcmon/{HOST}/battery/house/availability", f"dcmon/{HOST}/status")
    rig = Rig(tmp_path, broker, BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5))
    avail = f"dcmon/{HOST}/battery/house/availability"
    try:
        rig.cycle()
        assert sub.wait(lambda m: [p for _, t, p in m if t == avail] == ["online"])
        rig.sim.meter(2).silent = True                                 # the load meter stops answering
        rig.cycle()                                                    # the poller says so at once
        assert sub.wait(lambda m: [p for _, t, p in m if t == avail][-1:] == ["offline"])
        assert rig.mqtt.status()["batteries_offline"] == ["house"]
        rig.sim.meter(2).silent = False
        rig.cycle()
        assert sub.wait(lambda m: [p for _, t, p in m if t == avail][-1:] == ["online"])
        # stale without a meter going down: the monitor got no reading of it for longer than max_gap_s
        # (120 model seconds), while the poller still sees it answer
        rig.poller.extra_lines = None                                  # the monitor is fed by hand from here
        time.sleep(130 / SPEED)
        readings = rig.poller.poll_bus_once("a")
        assert {r.sensor for r in readings} == {"charger", "loads", "battery"}
        rig.svc.on_readings([r for r in readings if r.sensor == "charger"])
        assert rig.states[-1].stale_sensors == ("loads",)
        assert sub.wait(lambda m: [p for _, t, p in m if t == avail][-1:] == ["offline"])
        rig.svc.on_readings([r for r in rig.poller.poll_bus_once("a") if r.sensor != "battery"])
        assert rig.states[-1].stale_sensors == ()
        assert sub.wait(lambda m: [p for _, t, p in m if t == avail][-1:] == ["online"])
    finally:
        rig.close()
    assert sub.wait(lambda m: [p for _, t, p in m if t == f"dcmon/{HOST}/status"][-1:] == ["offline"])
    sub.stop()


def test_birth_message_re_announces_and_a_battery_that_left_the_config_is_removed(tmp_path, broker):
    s = MqttSettings.from_dict({"enabled": True, "url": broker.url}, "config.toml")
    meters = [MeterInfo(n, PZEM017, "a", i) for i, n in enumerate(("charger", "loads"), 1)]
    both = [BatteryInfo("house", ("charger", "loads")), BatteryInfo("van", ("loads",))]
    out = MqttOutput(s, host=HOST, meters=meters, batteries=both).start()
    try:
        van = BatteryMonitor(BatterySettings.preset("van", 100, battery_cable=["loads"]))
        out.publish_battery(van.snapshot())
        assert out.flush(10)
    finally:
        out.close()
    assert f"dcmon/{HOST}/battery/van/state" in retained(broker, f"dcmon/{HOST}/#")
    before = retained(broker, "homeassistant/#")
    assert sum("/_battery_van_" in t for t in before) == sum("/_battery_house_" in t for t in before) \
        == len(BATTERY_ENTITIES)

    sub = Sub(broker, "homeassistant/#")
    out = MqttOutput(s, host=HOST, meters=meters, batteries=both[:1]).start()   # van left the config
    try:
        assert sub.wait(lambda m: sum("/_battery_van_" in t and p == "" for _, t, p in m) == len(BATTERY_ENTITIES))
        after = retained(broker, "homeassistant/#")
        assert not [t for t in after if "/_battery_van_" in t]
        assert sum("/_battery_house_" in t for t in after) == len(BATTERY_ENTITIES)
        assert sum("/charger_" in t for t in after) == sum("/loads_" in t for t in after) == 6   # meters kept
        assert out.status()["entities_removed"] == len(BATTERY_ENTITIES)
        deadline = time.monotonic() + 10   # ... and the removed battery's retained state and availability
        while f"dcmon/{HOST}/battery/van/state" in retained(broker, f"dcmon/{HOST}/#") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [t for t in retained(broker, f"dcmon/{HOST}/#") if "/battery/van/" in t]
        # Home Assistant (re)starts: its birth message brings every battery entity and the state again
        mon = BatteryMonitor(BatterySettings.preset("house", 100, charge=["charger"], discharge=["loads"]))
        out.publish_battery(mon.snapshot())
        assert out.flush(10)
        sub2 = Sub(broker, "homeassistant/sensor/#", f"dcmon/{HOST}/battery/#")
        n = len(sub2.msgs)
        assert sum("/_battery_house_" in t for r, t, _ in sub2.msgs if r) == len(BATTERY_ENTITIES)  # retained
        subprocess.run(["mosquitto_pub", *broker.client_args(), "-t", "homeassistant/status", "-m", "online"],
                       check=True)

        def live(m):
            return [(t, p) for r, t, p in m[n:] if not r]
        assert sub2.wait(lambda m: sum("/_battery_house_" in t for t, _ in live(m)) == len(BATTERY_ENTITIES)
                         and any(t.endswith("/battery/house/state") for t, _ in live(m)))
        fresh = [json.loads(p) for t, p in live(sub2.msgs) if t.endswith("/battery/house/state")]
        assert fresh[-1]["soc_pct"] is None and fresh[-1]["status"] == "unknown"
        sub2.stop()
    finally:
        out.close()
        sub.stop()


ONCE_CFG = """
[poller]
host = "{host}"
[influxdb]
enabled = false
[spool]
path = "{tmp}/spool.sqlite"
[buses.house]
port = "/dev/null"
[[sensors]]
name = "solar"
bus = "house"
address = 1
[[sensors]]
name = "loads"
bus = "house"
address = 2
[[batteries]]
name = "house"
capacity_ah = 100
charge = ["solar"]
discharge = ["loads"]
[mqtt]
enabled = true
url = "{url}"
timeout_s = {timeout}
"""


def test_run_once_waits_for_a_broker_that_comes_up_late_and_delivers_the_battery(tmp_path, capfd):
    """`dcmon run --once` itself: the broker starts a second after the poller, which must wait for it (up to
    mqtt.timeout_s) and deliver the battery's state and entities before it exits."""
    from dcmon.cli import main

    broker = Mosquitto(tmp_path / "mosquitto")          # its port is chosen; it is not running yet
    cfg = tmp_path / "config.toml"
    cfg.write_text(ONCE_CFG.format(host="oncepi", tmp=tmp_path, url=broker.url, timeout=10))
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["run", "--once", "--simulate", "--no-print",
                                                        "--config", str(cfg)])))
    t.start()
    try:
        time.sleep(1.0)
        broker.start()
        t.join(30)
        assert not t.is_alive() and rc == [0]
        kept = retained(broker, "#")
    finally:
        broker.stop()
    state = json.loads(kept["dcmon/oncepi/battery/house/state"])
    assert state["soc_pct"] is None and state["soc_known"] is False and state["status"] in ("charging",
                                                                                          "discharging", "idle")
    assert kept["dcmon/oncepi/battery/house/availability"] == "online"
    assert sum("/_battery_house_" in k for k in kept) == len(BATTERY_ENTITIES)
    assert "dcmon/oncepi/solar/state" in kept and kept["dcmon/oncepi/status"] == "offline"
    err = capfd.readouterr().err
    assert "connection refused" in err and "connected as 'dcmon-oncepi'" in err   # it did wait
    assert "not connected within" not in err and "not acknowledged" not in err


def test_run_once_without_a_broker_says_so_in_one_line(tmp_path, capfd):
    from dcmon.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(ONCE_CFG.format(host="oncepi", tmp=tmp_path, url=f"mqtt://127.0.0.1:{free_port()}", timeout=1))
    start = time.monotonic()
    assert main(["run", "--once", "--simulate", "--no-print", "--config", str(cfg)]) == 0
    assert time.monotonic() - start < 10
    lines = [line for line in capfd.readouterr().err.splitlines() if "not connected within 1 s" in line]
    assert len(lines) == 1 and "states were not published" in lines[0] and "connection refused" in lines[0]


def test_the_payload_has_every_key_unknowns_as_null():
    """Every key is in every message (Home Assistant's templates read them), null while unknown."""
    import dataclasses

    from dcmon.outputs.mqtt import BATTERY_KEYS, battery_payload

    mon = BatteryMonitor(BatterySettings.preset("house", 100, charge=["charger"], discharge=["loads"]))
    st = mon.snapshot()
    plain = json.loads(battery_payload(dataclasses.replace(st, charged_kwh=0.9995), 0))
    assert plain["charged_kwh"] == 0.9995 and plain["soc_pct"] is None and plain["time"].startswith("1970-01-01T")
    assert set(BATTERY_KEYS) <= set(plain) and plain["time_to_go_s"] is None and plain["consumed_ah"] is None


def test_run_once_removes_a_battery_that_left_the_config_before_it_exits(tmp_path, broker):
    """A one-shot run (cron, a test bench) must finish what a long run would: the broker's retained configs of
    ours come back after the subscription, and flush() waits for them (a second subscription's SUBACK is the
    barrier) so that a battery that left the config is removed, with its state, before the process exits."""
    from dcmon.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(ONCE_CFG.format(host="oncepi", tmp=tmp_path, url=broker.url, timeout=10))
    assert main(["run", "--once", "--simulate", "--no-print", "--config", str(cfg)]) == 0
    kept = retained(broker, "#")
    assert sum("/_battery_house_" in k for k in kept) == len(BATTERY_ENTITIES) and \
        "dcmon/oncepi/battery/house/state" in kept
    text = cfg.read_text()
    cfg.write_text(text[:text.index("[[batteries]]")] + text[text.index("[mqtt]"):])   # the battery goes
    for _ in range(3):   # every one-shot run, not a lucky one
        assert main(["run", "--once", "--simulate", "--no-print", "--config", str(cfg)]) == 0
        kept = retained(broker, "#")
        assert not [k for k in kept if "_battery_house_" in k or "/battery/house/" in k], sorted(kept)
        assert "dcmon/oncepi/solar/state" in kept


def test_flush_waits_until_the_broker_has_sent_back_our_retained_configs(broker):
    """The barrier itself: until the SUBACK of the subscription made after the config filters has come,
    flush() does not report done (the removals those configs cause might still be on their way)."""
    s = MqttSettings.from_dict({"enabled": True, "url": broker.url}, "config.toml")
    meters = [MeterInfo("solar", PZEM017, "a", 1)]
    out = MqttOutput(s, host=HOST, meters=meters)
    held: list[tuple] = []
    seen: list[int] = []
    real = out._on_subscribe

    def hold_barrier(client, userdata, mid, codes, props):
        seen.append(mid)
        if len(seen) == 2:                # the second SUBACK of the connection is the barrier's
            held.append((client, userdata, mid, codes, props))
            return
        real(client, userdata, mid, codes, props)

    out._client.on_subscribe = hold_barrier
    out.start()
    try:
        assert out.wait_connected(10)
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held, "the barrier subscription was never answered"
        assert out.flush(1.0) is False        # configs not known to be all back: not done
        real(*held[0])                        # the SUBACK arrives
        assert out.flush(5.0) is True
    finally:
        out.close()


def test_states_waiting_counts_battery_states_too():
    """status()['states_waiting']: what is held for the broker, meters' and batteries' (no broker: never started)"""
    mon = BatteryMonitor(BatterySettings.preset("house", 100, charge=["charger"], discharge=["loads"]))
    s = MqttSettings.from_dict({"enabled": True, "url": "mqtt://127.0.0.1:1"}, "config.toml")
    out = MqttOutput(s, host=HOST, meters=[], batteries=[BatteryInfo("house", sensors=("charger", "loads"))])
    out.publish_battery(mon.snapshot())
    assert out.status()["states_waiting"] == 1
