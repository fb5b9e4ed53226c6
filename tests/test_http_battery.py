"""Batteries on the HTTP output's live page, with real parts: two simulated PZEM-017s on a real pty (a charger's
meter and a load's, driven by dcmon.battery_sim's battery model on a sped-up clock) read by the real Poller,
a real BatteryService whose ``on_state`` is the output's ``on_battery`` (as dcmon.service wires it), the
page in headless Chromium (tests/test_http.py's DevTools driver), the SSE stream and /state read with httpx,
and the whole `dcmon run` service at the end.

The model runs ``SPEED`` times faster than real time, so BatteryService gets the same sped-up monotonic clock
(as tests/test_battery_service.py does); the HTTP output's own clock (when a state came, stale by age) is
the real one.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port
from test_http import Chromium, settings

from dcmon import config
from dcmon.battery import BatteryState
from dcmon.battery_service import BatteryService
from dcmon.battery_sim import BatteryModel
from dcmon.outputs import http as h
from dcmon.outputs.http import HttpOutput
from dcmon.poller import Poller
from dcmon.simulator import Simulator

from battery_rig import clock, config_text, meters, no_rise_limit  # noqa: F401 - no_rise_limit: a fixture

# what the page-side object adds to BatteryService.status()'s entry
HTTP_KEYS = {"name", "sensors", "down_sensors", "updated_ns", "reason", "stale"}


class Rig:
    """Model + simulator + Poller + BatteryService + HttpOutput, fed the way dcmon.service feeds them;
    ``cycle()`` is one poll cycle. ``status_batteries``: whether the output's status dict (status.json) carries
    the batteries too, as the service's does (False: everything the output knows came through on_battery)."""

    def __init__(self, tmp: Path, port: str, model: BatteryModel, *, status_batteries: bool = True) -> None:
        self.model = model
        (tmp / "config.toml").write_text(config_text(port=port, spool=tmp / "spool.sqlite", host="boat"))
        self.cfg = config.load(tmp / "config.toml", env={})
        self.poller = Poller(self.cfg, put=lambda lines: None)
        self.status_batteries = status_batteries
        self.out = HttpOutput(settings(), status=self.status, healthy=lambda: True, host="boat",
                              batteries=self.cfg.batteries, interval_s=self.cfg.poller.interval_s)
        svc = BatteryService.from_config(self.cfg, mono=lambda: clock(time.monotonic()), on_state=self.out.on_battery)
        assert svc is not None
        self.svc = svc

    def status(self) -> dict:
        st = dict(self.poller.status())
        if self.status_batteries:
            st["batteries"] = self.svc.status()
        return st

    def cycle(self) -> None:
        readings = self.poller.poll_bus_once("a")
        for r in readings:
            self.out.on_reading(r)
        self.svc.on_readings(readings)
        for st in self.poller.states.values():
            self.out.meter_state(st.name, bool(st.up), {"host": "boat", "bus": st.cfg.bus, "model": st.cfg.model})

    def house(self) -> dict:
        """BatteryService.status()'s entry, as status.json carries it."""
        return json.loads(json.dumps(self.svc.status()["house"]))

    def until_synced(self, limit_s: float = 3 * 3600) -> None:
        start = clock(time.monotonic())
        while self.svc.status()["house"]["soc_pct"] is None:
            self.cycle()
            assert clock(time.monotonic()) - start < limit_s, "never synchronised"

    def discharge(self, load_a: float, sim_s: float) -> None:
        with self.model.lock:
            self.model.charger_max_a, self.model.load_a = 0.0, load_a
        end = clock(time.monotonic()) + sim_s
        while clock(time.monotonic()) < end:
            self.cycle()

    def close(self) -> None:
        self.svc.close()
        self.poller.close()


def read_events(url: str, got: list, stop: threading.Event) -> None:
    """(event type, data) of every server-sent event, "message" for the unnamed ones."""
    try:
        with httpx.stream("GET", url, timeout=30) as r:
            event = "message"
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    got.append((event, json.loads(line[6:])))
                elif line == "":
                    event = "message"
                if stop.is_set():
                    return
    except httpx.HTTPError:
        pass


def last_battery(got: list, name: str = "house") -> dict | None:
    found = [d for e, d in got if e == "battery" and d.get("name") == name]
    return found[-1] if found else None


def status_part(b: dict, want: dict) -> dict:
    """The keys of BatteryService.status()'s entry, from the page's battery object."""
    assert set(want) <= set(b), set(want) - set(b)
    return {k: b[k] for k in want}


def wait(pred, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


# --------------------------------------------------------------------------------------- stream and JSON

def test_sse_and_state_carry_the_battery_state_equal_to_the_service_status_unknown_as_null(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model, status_batteries=False)   # the state can only come by on_battery
        stop = threading.Event()
        got: list = []
        try:
            with rig.out as out:
                reader = threading.Thread(target=read_events, args=(out.url + "/events", got, stop), daemon=True)
                reader.start()
                assert wait(lambda: out.live_clients == 1)
                first = wait(lambda: last_battery(got))           # at connect: the battery, not read yet
                assert first["updated_ns"] is None and first["stale"] is True and first["soc_pct"] is None
                assert first["sensors"] == ["charger", "loads"] and first["capacity_ah"] == 5.0

                rig.cycle()                                       # charging, not synchronised: unknown
                b = wait(lambda: (x := last_battery(got)) and x["updated_ns"] and x)
                want = rig.house()
                assert status_part(b, want) == want
                for k in ("soc_pct", "time_to_go_s", "consumed_ah"):
                    assert k in b and b[k] is None, (k, b[k])     # null, never 0, never left out
                assert '"soc_pct": null' in httpx.get(out.url + "/state").text
                assert b["status"] == "charging" and b["current_a"] > 1 and b["reason"] == "not synchronised yet"
                assert b["stale"] is False and b["down_sensors"] == [] and set(b) == set(want) | HTTP_KEYS
                state = httpx.get(out.url + "/state").json()
                assert [m["sensor"] for m in state["meters"]] == ["charger", "loads"]
                assert status_part(state["batteries"][0], want) == want

                rig.until_synced()
                rig.discharge(1.0, 600)
                want = rig.house()
                assert isinstance(want["soc_pct"], float) and want["status"] == "discharging"
                assert want["time_to_go_s"] > 0 and want["consumed_ah"] > 0
                b = wait(lambda: (x := last_battery(got)) and x["soc_pct"] == want["soc_pct"] and x)
                assert b and status_part(b, want) == want, (b, want)
                (only,) = httpx.get(out.url + "/state").json()["batteries"]
                assert status_part(only, want) == want and only["stale"] is False
                assert only["updated_ns"] == b["updated_ns"]
                # unnamed events carry the meters only: the batteries come as their own events
                assert all("batteries" not in d and "meters" in d for e, d in got if e == "message")
        finally:
            stop.set()
            rig.close()


def test_a_battery_whose_meter_stops_answering_is_stale_then_down(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        try:
            with rig.out as out:
                rig.cycle()
                (b,) = out.batteries()
                assert b["stale"] is False and b["status"] == "discharging"
                sim.meter(2).silent = True                         # the loads' meter stops answering
                rig.cycle()
                (b,) = out.batteries()
                assert b["stale"] is True and b["down_sensors"] == ["loads"]
                sim.meter(1).silent = True
                rig.cycle()                                        # no reading: no on_battery, still DOWN
                (b,) = httpx.get(out.url + "/state").json()["batteries"]
                assert b["stale"] is True and b["down_sensors"] == ["charger", "loads"]
                sim.meter(1).silent = sim.meter(2).silent = False
                rig.cycle()
                (b,) = out.batteries()
                assert b["stale"] is False and b["down_sensors"] == []
        finally:
            rig.close()


def _state(**kw) -> BatteryState:
    base = dict(name="house", status="discharging", soc_pct=80.0, time_to_go_s=3600.0, unknown_reason="",
                voltage_v=12.5, current_a=-2.0, power_w=-25.0, consumed_ah=20.0, charged_ah=1.0, discharged_ah=21.0,
                charged_kwh=0.01, discharged_kwh=0.25, deepest_discharge_ah=None, last_discharge_ah=None,
                average_discharge_ah=None, full_cycles=0.2, synchronisations=1, min_voltage_v=12.0,
                max_voltage_v=14.1, last_full_ns=None, time_since_full_s=None)
    return BatteryState(**{**base, **kw})


def test_stale_by_age_and_a_battery_known_only_from_the_status_dict():
    """No state for longer than max(max_gap_s, 3 × interval): stale even though every meter is up (a stuck bus
    thread); a battery the output was not told about still shows, from status.json."""
    from dcmon.battery import BatterySettings
    info = {"house": h._BatteryInfo.of(BatterySettings.preset("house", 100, charge=["c"], discharge=["d"]), 5.0)}
    assert info["house"].stale_after_s == 60.0
    now = time.time_ns()
    fresh = h._batteries({"house": (_state(), now - 30 * 10**9)}, {"c": True, "d": True}, info, {}, now)
    old = h._batteries({"house": (_state(), now - 61 * 10**9)}, {"c": True, "d": True}, info, {}, now)
    assert fresh[0]["stale"] is False and old[0]["stale"] is True and old[0]["soc_pct"] == 80.0
    st = {"batteries": {"van": {"soc_pct": None, "unknown_reason": "battery van: one meter on the battery cable "
                                "(shunt). A PZEM-017's current has no sign", "stale_sensors": []}}}
    (van,) = h._batteries({}, {}, {}, st, now)
    assert van["reason"] == "one meter on the battery cable (shunt)" and van["soc_pct"] is None
    assert van["stale"] is True and van["updated_ns"] is None and van["time_to_go_s"] is None


# ---------------------------------------------------------------------------------- slow and stalled clients

def test_a_client_queue_keeps_the_newest_state_of_each_battery():
    c = h._Client()
    for i in range(3 * h.SSE_QUEUE):
        c.push(b"snapshot %d" % i)
        c.push(b"house %d" % i, "battery:house")
        if i == 1:
            c.push(b"van 1", "battery:van")
    items = c.take(0)
    assert len(items) <= h.SSE_QUEUE and c.dropped > 0
    assert b"house %d" % (3 * h.SSE_QUEUE - 1) in items and b"van 1" in items     # never dropped for a snapshot
    assert sum(x.startswith(b"house") for x in items) == 1                       # only the newest
    assert items[-1] == b"house %d" % (3 * h.SSE_QUEUE - 1) and b"snapshot %d" % (3 * h.SSE_QUEUE - 1) in items


def _on_battery_cost_us(out: HttpOutput, states: list[BatteryState], n: int = 3000) -> float:
    per = []
    for _ in range(n // len(states)):
        t = time.perf_counter()
        for st in states:
            out.on_battery(st)
        per.append((time.perf_counter() - t) / len(states) * 1e6)
    return statistics.median(per)


def test_a_stalled_live_client_does_not_slow_on_battery(tmp_path, no_rise_limit, monkeypatch):
    monkeypatch.setattr(h, "SSE_WRITE_TIMEOUT_S", 2.0)
    model = BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        stop = threading.Event()
        got: list[list] = [[] for _ in range(20)]
        stalled: socket.socket | None = None
        try:
            with rig.out as out:
                rig.cycle()
                real = rig.svc.monitors["house"].snapshot()
                states = [dataclasses.replace(real, voltage_v=12.0 + i / 1000) for i in range(100)]
                alone = _on_battery_cost_us(out, states)
                for g in got:
                    threading.Thread(target=read_events, args=(out.url + "/events", g, stop), daemon=True).start()
                stalled = socket.create_connection(("127.0.0.1", out.settings.address[1]))
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")   # and never reads
                assert wait(lambda: out.live_clients == 21)
                monkeypatch.setattr(h, "SNAPSHOT_MIN_INTERVAL_S", 0.005)      # events as fast as they come
                busy = _on_battery_cost_us(out, states)
                t = time.monotonic()
                while out.live_clients > 20 and time.monotonic() - t < 30:  # until the stalled one is dropped
                    _on_battery_cost_us(out, states, 100)
                    time.sleep(0.01)
                monkeypatch.setattr(h, "SNAPSHOT_MIN_INTERVAL_S", 0.25)
                out.on_battery(real)
                # (how much a client costs on_battery is measured by bench/bench_http.py, side by side; here:
                # the stalled client is dropped and every live one still gets the newest state)
                assert alone > 0 and busy > 0
                assert out.live_clients == 20                               # the stalled one was dropped
                assert wait(lambda: all((last_battery(g) or {}).get("voltage_v") == real.voltage_v for g in got))
        finally:
            stop.set()
            if stalled is not None:
                stalled.close()
            rig.close()


# --------------------------------------------------------------------------------------------- the page

BAT = "document.querySelector('[data-battery=\"house\"]')"


def test_the_page_shows_a_battery_unknown_then_its_state_of_charge(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        browser = None
        try:
            with rig.out as out:
                rig.cycle()
                browser = Chromium(tmp_path / "chromium-profile")
                browser.open(out.url + "/")
                browser.wait(f"{BAT}?.dataset.updated > 0")
                # every text the SoC ever shows, from here on
                browser.js("window.socs = []; new MutationObserver(() => window.socs.push("
                           f"{BAT}.querySelector('.soc').textContent)).observe({BAT}.querySelector('.soc'), "
                           "{childList: true, characterData: true, subtree: true}); true")
                q = lambda sel: browser.js(f"{BAT}.querySelector('{sel}').textContent")   # noqa: E731
                assert q(".soc") == "unknown" and q(".why") == "not synchronised yet"
                assert browser.js(f"{BAT}.querySelector('.gauge .fill').style.width") in ("0", "0px")
                assert q(".badge") == "charging" and q(".ttg") == "–" and q(".used") == "– Ah"
                assert q(".net").startswith("+") and float(q(".net")[1:]) > 1.0
                assert float(q(".bv")) == pytest.approx(rig.house()["voltage_v"], abs=0.006)
                # the battery card sits above the meters
                assert browser.js("document.getElementById('batteries').getBoundingClientRect().bottom <= "
                                  "document.getElementById('meters').getBoundingClientRect().top")

                rig.until_synced()
                rig.discharge(1.0, 900)
                want = rig.house()
                soc = f"{want['soc_pct']:.1f} %"
                # the newest state, not an earlier one of the discharge that rounds to the same text
                browser.wait(f"{BAT}.querySelector('.soc').textContent === '{soc}' && Math.abs(parseFloat("
                             f"{BAT}.querySelector('.gauge .fill').style.width) - {want['soc_pct']}) < 0.01")
                assert 90 < want["soc_pct"] < 100
                assert q(".why") == "" and q(".badge") == "discharging" and q(".net") == f"−{-want['current_a']:.2f}"
                width = float(browser.js(f"{BAT}.querySelector('.gauge .fill').style.width").rstrip("%"))
                assert width == pytest.approx(want["soc_pct"], abs=0.01)
                ttg = q(".ttg")                                   # "5 h 12 min to 50 %"
                hours, _, rest = ttg.partition(" h ")
                minutes = float(rest.split(" min")[0])
                assert ttg.endswith(" min to 50 %"), ttg
                assert int(hours) * 3600 + minutes * 60 == pytest.approx(want["time_to_go_s"], abs=61)
                assert q(".used") == f"{want['consumed_ah']:.1f} Ah"
                assert browser.js(f"{BAT}.dataset.stale") == "0"

                sim.meter(2).silent = True                         # the loads' meter stops answering
                rig.cycle()
                browser.wait(f"{BAT}.dataset.stale === '1'")
                assert q(".badge") == "stale" and "not read lately: loads" in q(".small")
                held = float(q(".soc").removesuffix(" %"))             # the held SoC, and no stale values
                assert held == pytest.approx(want["soc_pct"], abs=1.0) and q(".net") == q(".bv") == q(".ttg") == "–"
                sim.meter(1).silent = True
                rig.cycle()
                browser.wait(f"{BAT}.querySelector('.badge').textContent === 'DOWN'")
                shot = tmp_path / "http-page-battery.png"
                browser.screenshot(shot)
                print(f"screenshot of the page: {shot}")
                socs = browser.js("window.socs")
                assert socs and not [s for s in socs if s.startswith("0")], socs   # unknown is never 0 %
                assert "unknown" not in socs[-1]
        finally:
            if browser is not None:
                browser.close()
            rig.close()


def test_the_polling_fallback_shows_the_battery_too(tmp_path, no_rise_limit):
    model = BatteryModel(capacity_ah=5, soc=0.5, load_a=0.5)
    with Simulator(meters(model)) as sim:
        rig = Rig(tmp_path, sim.path, model)
        browser = None
        try:
            with rig.out as out:
                rig.cycle()
                out.page = out.page.replace(b"if (!window.EventSource)", b"if (true)")
                browser = Chromium(tmp_path / "chromium-profile")
                browser.open(out.url + "/")
                browser.wait(f"{BAT}?.querySelector('.soc').textContent === 'unknown'")
                assert browser.js("document.getElementById('conn').textContent") == "polling every 5 s"
                assert browser.js(f"{BAT}.querySelector('.net').textContent").startswith("−")
                assert out.live_clients == 0
        finally:
            if browser is not None:
                browser.close()
            rig.close()


# --------------------------------------------------------------------------------------- the whole service

def test_the_running_service_puts_its_batteries_on_the_page(tmp_path, monkeypatch, no_rise_limit):
    """`dcmon run`'s service (dcmon.service.Service) with [http] and [[batteries]]: the BatteryService's states
    reach the HTTP output through on_battery (updated_ns is set only there), /state and /status agree."""
    from dcmon.service import Service

    model = BatteryModel(capacity_ah=100, soc=0.6, load_a=2.0)
    port = free_port()
    monkeypatch.setenv("DCMON_STATUS_PATH", str(tmp_path / "status.json"))
    with Simulator(meters(model)) as sim:
        (tmp_path / "config.toml").write_text(config_text(
            port=sim.path, spool=tmp_path / "spool.sqlite", host="boat", poller="interval_s = 0.3\nhealth_interval_s = 0",
            influxdb="enabled = false", extra=f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'))
        service = Service(config.load(tmp_path / "config.toml", env={}))
        stop = threading.Event()
        service.start_outputs()
        thread = threading.Thread(target=service.run_forever, args=(stop,), daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{port}"
            b = wait(lambda: [x for x in httpx.get(url + "/state", timeout=5).json()["batteries"] if x["updated_ns"]])
            assert b, httpx.get(url + "/state").json()
            (house,) = b
            assert house["name"] == "house" and house["soc_pct"] is None and house["status"] == "discharging"
            assert house["reason"] == "not synchronised yet" and house["stale"] is False
            st = httpx.get(url + "/status", timeout=5).json()["batteries"]["house"]
            assert set(st) <= set(house) and st["soc_pct"] is None and st["capacity_ah"] == house["capacity_ah"]
            assert httpx.get(url + "/", timeout=5).text.count('id="btpl"') == 1
        finally:
            stop.set()
            thread.join(timeout=30)
            service.close()
