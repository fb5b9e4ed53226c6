"""The battery monitor against a battery model with a known capacity, Peukert exponent and efficiency.

Most tests run the model in simulated time (fast), feeding the monitor what two PZEM-017 meters would
report (through the real register encoding: 0.01 V, 0.01 A, 0.1 W, whole-Wh counters). One test runs the
real simulator on a pty, read with real Bus reads, the model on a sped-up clock.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dcmon.battery import BatteryMonitor, BatterySettings, limits, peukert_factor, settings_list
from dcmon.battery_sim import BatteryModel, pzem_reading
from dcmon.battery_store import BatteryStore, SaveSchedule
from dcmon.errors import ConfigError

T0_NS = 1_700_000_000 * 10**9
ROOT = Path(__file__).resolve().parents[1]


class Rig:
    """A model, two meters' readings, a monitor; ``run`` advances simulated time and feeds every poll."""

    def __init__(self, model: BatteryModel, settings: BatterySettings, poll_s: float = 5.0) -> None:
        self.m, self.s, self.poll_s = model, settings, poll_s
        self.mon = BatteryMonitor(settings)
        self.mono_offset = 0.0        # a restarted poller's monotonic clock starts elsewhere
        self.max_err = 0.0            # worst |estimate − truth| while the estimate was known
        self.known_samples = 0
        self.offline = False          # poller down: the model runs, nobody reads

    def feed(self) -> None:
        m = self.m
        ns = T0_NS + int(m.t_s * 1e9)
        mono = m.t_s + self.mono_offset
        self.mon.update("charger", ns, mono, pzem_reading(*m.sample("charge")))
        self.mon.update("loads", ns, mono, pzem_reading(*m.sample("load")))

    def run(self, seconds: float, *, check: bool = True) -> None:
        for _ in range(int(round(seconds / self.poll_s))):
            self.m.advance(self.poll_s, step_s=self.poll_s)
            if self.offline:
                continue
            self.feed()
            soc = self.mon.snapshot().soc_pct
            if check and soc is not None:
                self.known_samples += 1
                self.max_err = max(self.max_err, abs(soc - self.m.soc * 100))

    def charge_until_synced(self, charger_a: float, limit_s: float = 12 * 3600) -> float:
        """Run with the charger on until the monitor synchronises; returns the seconds it took."""
        syncs = self.mon.h.syncs
        self.m.charger_max_a = charger_a
        t = 0.0
        while self.mon.h.syncs == syncs:
            self.run(60)
            t += 60
            assert t < limit_s, "never synchronised"
        return t

    def restart(self, store: BatteryStore, down_s: float = 0.0) -> None:
        """Save, 'kill' the poller, let the model run ``down_s`` unobserved, start a new monitor from the store."""
        store.save({self.s.name: self.mon.to_state()})
        self.offline = True
        self.run(down_s, check=False)
        self.offline = False
        self.mono_offset += 12345.0
        self.mon = BatteryMonitor.restore(self.s, store.load(self.s.name), T0_NS + int(self.m.t_s * 1e9))


def lead(**kw) -> BatterySettings:
    return BatterySettings.preset("house", kw.pop("capacity_ah", 100), "lead-acid", charge=["charger"],
                                  discharge=["loads"], **kw)


# ------------------------------------------------------------------------------------------ scenarios

def test_lead_acid_full_charge_discharge_partial_cycles_and_restart(tmp_path):
    """Unknown before the first synchronisation; then within 2 % SoC through a discharge to the floor,
    partial cycles and a restart in the middle; time to go within 10 % of the model's at constant load."""
    model = BatteryModel(capacity_ah=200, soc=0.55, peukert=1.25, efficiency=0.95)
    rig = Rig(model, lead(capacity_ah=200))
    model.load_a = 3.0
    rig.run(3600)                                            # discharging, never synchronised
    st = rig.mon.snapshot()
    assert st.soc_pct is None and st.time_to_go_s is None and st.consumed_ah is None
    assert "not synchronised" in st.unknown_reason
    assert st.status == "discharging" and st.current_a == pytest.approx(-3.0, abs=0.02)

    took = rig.charge_until_synced(40.0)                     # full charge: bulk, absorption, tail
    assert model.soc > 0.995 and took > 3600
    assert rig.mon.snapshot().soc_pct == pytest.approx(100.0, abs=0.01)
    rig.run(1800)                                            # float

    model.charger_max_a, model.load_a = 0.0, 10.0            # constant load, down to the floor
    rig.run(1800)
    st = rig.mon.snapshot()
    want = model.time_to_floor_s(50.0)
    assert st.time_to_go_s == pytest.approx(want, rel=0.10)
    assert st.status == "discharging"
    while rig.mon.snapshot().soc_pct > 50.0:
        rig.run(600)
    assert rig.mon.snapshot().time_to_go_s == 0.0
    assert model.soc == pytest.approx(0.5, abs=0.02)

    with BatteryStore.open(tmp_path / "battery.db") as store:   # partial cycles, a restart in the middle
        for _ in range(2):
            model.charger_max_a, model.load_a = 30.0, 4.0
            rig.run(2 * 3600)
            model.charger_max_a, model.load_a = 0.0, 15.0
            rig.run(1.5 * 3600)
        rig.restart(store, down_s=900)                       # the load runs on while the poller is down
        st = rig.mon.snapshot()
        assert st.soc_pct is not None
        model.charger_max_a, model.load_a = 25.0, 2.0
        rig.run(1.5 * 3600)
    assert rig.max_err < 2.0, f"worst error {rig.max_err:.2f} % SoC"
    assert rig.known_samples > 1000
    st = rig.mon.snapshot()
    assert st.synchronisations == 1 and st.full_cycles > 0.5
    assert st.deepest_discharge_ah == pytest.approx(100, abs=5)
    assert st.discharged_ah > st.charged_ah * 0.5


def test_lifepo4_preset_cycle():
    s = BatterySettings.preset("lfp", 100, "lifepo4", charge=["charger"], discharge=["loads"])
    assert (s.charge_efficiency_pct, s.peukert, s.discharge_floor_pct, s.charged_voltage_v) == (99, 1.05, 10, 14.0)
    model = BatteryModel(capacity_ah=100, chemistry="lifepo4", soc=0.7, peukert=1.05, efficiency=0.99)
    rig = Rig(model, s)
    rig.charge_until_synced(50.0)
    model.charger_max_a, model.load_a = 0.0, 30.0
    rig.run(2.5 * 3600)
    st = rig.mon.snapshot()
    assert st.time_to_go_s == pytest.approx(model.time_to_floor_s(10.0), rel=0.10)
    assert rig.max_err < 2.0
    assert st.soc_pct == pytest.approx(model.soc * 100, abs=2.0) and st.soc_pct < 30


# ------------------------------------------------------------------------------ synchronisation rules

def _feed(mon, t, v, i_in, i_out, e):
    ns = T0_NS + int(t * 1e9)
    mon.update("charger", ns, t, {"voltage_v": v, "current_a": i_in, "power_w": v * i_in, "energy_wh": e[0]})
    mon.update("loads", ns, t, {"voltage_v": v, "current_a": i_out, "power_w": v * i_out, "energy_wh": e[1]})


def _hold(mon, t0, seconds, v, i_in, i_out, step=5.0):
    t = t0
    while t < t0 + seconds - 1e-9:
        t += step
        _feed(mon, t, v, i_in, i_out, (0, 0))
    return t


def test_sync_needs_voltage_tail_current_and_the_detection_time():
    s = lead()                               # 13.2 V, tail 4 A, 3 min
    assert (s.charged_voltage_v, s.tail_current_a, s.charged_detection_min) == (13.2, 4.0, 3.0)
    mon = BatteryMonitor(s)
    t = _hold(mon, 0, 600, 14.4, 6.0, 1.0)   # voltage high, but 5 A net > tail
    assert mon.h.syncs == 0
    t = _hold(mon, t, 600, 13.1, 3.0, 1.0)   # tail current, but voltage below charged voltage
    assert mon.h.syncs == 0
    t = _hold(mon, t, 600, 13.6, 0.0, 3.0)   # voltage above (surface charge) but discharging
    assert mon.h.syncs == 0
    t = _hold(mon, t, 170, 14.0, 3.0, 0.5)   # all three, 170 s ...
    t = _hold(mon, t, 5, 14.0, 6.0, 0.5)     # ... broken for one poll: the timer starts again
    t = _hold(mon, t, 175, 14.0, 3.0, 0.5)
    assert mon.h.syncs == 0 and mon.snapshot().soc_pct is None
    t = _hold(mon, t, 10, 14.0, 3.0, 0.5)    # 185 s unbroken
    assert mon.h.syncs == 1 and mon.snapshot().soc_pct == pytest.approx(100.0, abs=0.01)
    t = _hold(mon, t, 3600, 14.0, 3.0, 0.5)  # float for an hour: one synchronisation, not twenty
    assert mon.h.syncs == 1
    t = _hold(mon, t, 60, 12.5, 0.0, 5.0)    # a discharge breaks it, the next full charge counts again
    t = _hold(mon, t, 200, 14.0, 2.0, 0.0)
    assert mon.h.syncs == 2
    assert any("synchronised to 100 %" in e for e in mon.drain_events())


def test_detection_time_and_tail_are_settings():
    s = lead(charged_detection_min=10, tail_current_pct=1.0, charged_voltage_v=13.8)
    mon = BatteryMonitor(s)
    t = _hold(mon, 0, 400, 14.0, 1.5, 0.0)   # 1.5 A > 1 % of 100 Ah
    t = _hold(mon, t, 590, 14.0, 0.5, 0.0)
    assert mon.h.syncs == 0
    _hold(mon, t, 15, 14.0, 0.5, 0.0)
    assert mon.h.syncs == 1


def test_no_sync_while_a_meter_is_stale():
    mon = BatteryMonitor(lead())
    t = 0.0
    for _ in range(60):                      # only the charger's meter answers
        t += 5
        mon.update("charger", T0_NS + int(t * 1e9), t, {"voltage_v": 14.2, "current_a": 1.0, "power_w": 14.2,
                                                       "energy_wh": 0})
    assert mon.h.syncs == 0
    st = mon.snapshot()
    assert st.status == "unknown" and st.current_a is None and st.stale_sensors == ("loads",)


# ------------------------------------------------------------------------------ counting rules

def _synced(settings=None) -> tuple[BatteryMonitor, float]:
    mon = BatteryMonitor(settings or lead())
    return mon, _hold(mon, 0, 200, 14.0, 2.0, 0.0)


def _flow(mon, t, seconds, v, i_in, i_out, e, step=5.0):
    """Constant currents; the counters integrate them continuously and truncate to whole Wh."""
    for _ in range(int(seconds / step)):
        t += step
        e[0] += v * i_in * step / 3600
        e[1] += v * i_out * step / 3600
        _feed(mon, t, v, i_in, i_out, (math.floor(e[0]), math.floor(e[1])))
    return t


def test_current_threshold_counts_small_net_currents_as_zero():
    mon, t = _synced()
    _flow(mon, t, 10 * 3600, 12.8, 0.0, 0.08, [0.0, 0.0])      # 0.08 A for 10 h, below 0.1 A: nothing
    assert mon.snapshot().soc_pct == 100.0
    mon, t = _synced(lead(current_threshold_a=0.0))           # threshold off: 0.8 Ah counted
    _flow(mon, t, 10 * 3600, 12.8, 0.0, 0.08, [0.0, 0.0])
    st = mon.snapshot()
    assert st.consumed_ah == pytest.approx(0.8, abs=0.03)
    assert st.status == "discharging"
    mon, t = _synced()                                        # a net below the threshold: charger − loads
    _flow(mon, t, 3600, 12.8, 10.0, 9.95, [0.0, 0.0])
    assert mon.snapshot().soc_pct == 100.0 and mon.snapshot().status == "idle"


def test_charge_efficiency_on_charge_and_peukert_on_discharge():
    s = lead()
    mon, t = _synced(s)
    e = [0.0, 0.0]
    t = _flow(mon, t, 3600, 12.5, 0.0, 20.0, e)              # 20 Ah out at 4× the 20 h rate
    f = peukert_factor(s, 20.0)
    assert f == pytest.approx(4 ** 0.25)
    st = mon.snapshot()
    assert st.consumed_ah == pytest.approx(20.0, abs=0.15)
    assert st.soc_pct == pytest.approx(100 - 20 * f, abs=0.15)
    soc0 = st.soc_pct
    _flow(mon, t, 3600, 13.0, 10.0, 0.0, e)                   # 10 Ah in stores 9.5
    st = mon.snapshot()
    assert st.soc_pct == pytest.approx(soc0 + 9.5, abs=0.1)
    assert st.charged_ah == pytest.approx(10.0, abs=0.1) and st.discharged_ah == pytest.approx(20.0, abs=0.15)


def test_the_counter_is_the_long_term_truth_and_power_fills_in_between_its_steps():
    """24 W for 2 h on one meter, polled every second: the counter steps every 150 s; the estimate
    follows the true energy within the counter's resolution at every poll, and ends within 1 Wh."""
    mon, t = _synced(lead(current_threshold_a=0.0))
    true_wh, worst, counter_lag = 0.0, 0.0, 0.0
    v, i = 12.0, 2.0
    for k in range(7200):
        t += 1
        true_wh += v * i / 3600
        # the meter's sampled power is a little off (a real one is noisy): the counter keeps us honest
        p = v * i * (1.15 if (k // 600) % 2 else 0.9)
        mon.update("loads", T0_NS + int(t * 1e9), t, {"voltage_v": v, "current_a": i, "power_w": p,
                                                     "energy_wh": math.floor(true_wh)})
        mon.update("charger", T0_NS + int(t * 1e9), t, {"voltage_v": v, "current_a": 0, "power_w": 0, "energy_wh": 0})
        est_wh = mon.h.discharged_wh
        worst = max(worst, abs(est_wh - true_wh))
        counter_lag = max(counter_lag, true_wh - math.floor(true_wh))
    assert worst < 1.0 and counter_lag > 0.9
    assert mon.h.discharged_wh == pytest.approx(48.0, abs=1.0)
    assert mon.h.discharged_ah == pytest.approx(4.0, abs=0.09)


def test_a_polling_gap_is_bridged_by_the_counters():
    model = BatteryModel(capacity_ah=100, soc=0.9)
    rig = Rig(model, lead())
    rig.charge_until_synced(20.0)
    model.charger_max_a, model.load_a = 0.0, 8.0
    rig.run(1800)
    rig.offline = True                       # the bus is down for 40 min; meters keep counting
    rig.run(2400, check=False)
    rig.offline = False
    rig.run(600)
    assert rig.mon.snapshot().soc_pct == pytest.approx(model.soc * 100, abs=1.0)
    assert rig.max_err < 2.0


# ------------------------------------------------------------------------------ restart rules

def _rig_synced(**kw) -> Rig:
    model = BatteryModel(capacity_ah=100, soc=0.95)
    rig = Rig(model, lead(**kw))
    rig.charge_until_synced(20.0)
    model.charger_max_a, model.load_a = 0.0, 6.0
    rig.run(3600)
    return rig


def test_restart_restores_the_state_and_counts_what_flowed_while_down(tmp_path):
    rig = _rig_synced()
    with BatteryStore.open(tmp_path / "b.db") as store:
        before = rig.mon.snapshot()
        rig.restart(store, down_s=1800)       # 30 min at 6 A, nobody polling
    st = rig.mon.snapshot()
    assert st.soc_pct is None or st.soc_pct == pytest.approx(before.soc_pct)  # nothing read yet
    rig.run(30)
    st = rig.mon.snapshot()
    assert st.soc_pct == pytest.approx(rig.m.soc * 100, abs=1.0)
    assert st.synchronisations == before.synchronisations
    assert st.discharged_ah == pytest.approx(before.discharged_ah + 3.0, abs=0.3)


def test_restart_after_state_max_age_is_unknown_but_history_kept(tmp_path):
    rig = _rig_synced(state_max_age_h=1)
    with BatteryStore.open(tmp_path / "b.db") as store:
        hist = rig.mon.snapshot().discharged_ah
        rig.m.load_a = 0.0
        rig.restart(store, down_s=2 * 3600)
    st = rig.mon.snapshot()
    assert st.soc_pct is None and "2.0 h old" in st.unknown_reason
    assert st.discharged_ah == pytest.approx(hist) and st.synchronisations == 1


def test_restart_with_another_capacity_or_meters_is_unknown(tmp_path):
    rig = _rig_synced()
    with BatteryStore.open(tmp_path / "b.db") as store:
        store.save({"house": rig.mon.to_state()})
        saved = store.load("house")
    now = T0_NS + int(rig.m.t_s * 1e9)
    assert BatteryMonitor.restore(lead(), saved, now).snapshot().soc_pct is not None
    other = BatteryMonitor.restore(lead(capacity_ah=150), saved, now)
    assert other.soc_known is False and "capacity or meters changed" in other.unknown_reason
    moved = BatterySettings.preset("house", 100, charge=["charger", "solar"], discharge=["loads"])
    assert BatteryMonitor.restore(moved, saved, now).soc_known is False


def test_counter_reset_while_down_loses_the_state_short_reset_does_not(tmp_path):
    rig = _rig_synced()
    with BatteryStore.open(tmp_path / "b.db") as store:
        rig.restart(store, down_s=600)
    rig.m.load_wh = 0.0                        # the load meter lost its counter while nobody read it
    rig.run(10)
    st = rig.mon.snapshot()
    assert st.soc_pct is None and "energy counter of loads was reset" in st.unknown_reason

    rig = _rig_synced()
    rig.run(5)
    rig.m.load_wh = 0.0                        # reset between two polls 5 s apart: P × Δt stands in
    rig.run(600)
    assert rig.mon.snapshot().soc_pct == pytest.approx(rig.m.soc * 100, abs=0.5)


# ------------------------------------------------------------------------------ the store

def test_store_is_wal_full_sync_and_one_transaction_per_save(tmp_path):
    p = tmp_path / "b.db"
    with BatteryStore.open(p) as store:
        mons = {n: BatteryMonitor(BatterySettings.preset(n, 100, charge=["a"], discharge=["b"])) for n in ("x", "y")}
        assert store.save({n: m.to_state() for n, m in mons.items()})
        assert store.commits == 1
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
    sched = SaveSchedule(30)
    assert sched.due(0.0) and not sched.due(29.0) and sched.due(30.0) and sched.due(31.0, changed=True)


def test_state_survives_kill_9(tmp_path):
    """A child process saves and is killed with SIGKILL straight after; the state is there."""
    p = tmp_path / "b.db"
    code = textwrap.dedent(f"""
        import os, signal
        from dcmon.battery import BatteryMonitor, BatterySettings
        from dcmon.battery_store import BatteryStore
        s = BatterySettings.preset("house", 100, charge=["c"], discharge=["d"])
        m = BatteryMonitor(s)
        m.synchronise({T0_NS})
        m.used_ah = 12.5
        st = BatteryStore.open({str(p)!r})
        st.save({{"house": m.to_state({T0_NS})}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30)
    assert r.returncode == -signal.SIGKILL
    with BatteryStore.open(p) as store:
        state = store.load("house")
    s = BatterySettings.preset("house", 100, charge=["c"], discharge=["d"])
    mon = BatteryMonitor.restore(s, state, T0_NS + 60 * 10**9)
    assert mon.soc_known and mon.snapshot().soc_pct == pytest.approx(87.5)
    assert mon.snapshot().synchronisations == 1


def test_a_corrupt_or_foreign_file_is_moved_aside(tmp_path, caplog):
    p = tmp_path / "b.db"
    p.write_bytes(b"this is not a database" * 100)
    with BatteryStore.open(p) as store:
        assert store.moved_aside is not None and store.moved_aside.exists()
        assert store.load("house") is None
        assert store.save({"house": {"saved_ns": 1, "x": 1}})
    assert "moved it to" in caplog.text
    q = tmp_path / "other.db"
    with sqlite3.connect(q) as db:
        db.execute("CREATE TABLE t (x)")
    with BatteryStore.open(q) as store:
        assert store.moved_aside is not None


# ------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("data,key,text", [
    ({"name": "h", "charge": ["a"], "discharge": ["b"]}, "batteries.capacity_ah", "is required"),
    ({"name": "h", "capacity_ah": 0, "charge": ["a"]}, "batteries.capacity_ah", "more than 0"),
    ({"name": "h", "capacity_ah": 100, "chemistry": "nicad", "charge": ["a"]}, "batteries.chemistry", "lifepo4"),
    ({"name": "h", "capacity_ah": 100, "peukert": 1.8, "charge": ["a"]}, "batteries.peukert", "from 1 to 1.5"),
    ({"name": "h", "capacity_ah": 100, "tail_curent_pct": 2, "charge": ["a"]}, "batteries.tail_curent_pct",
     "tail_current_pct"),
    ({"name": "h", "capacity_ah": 100, "charge": ["a"], "discharge": ["a"]}, "batteries.discharge", "more than once"),
    ({"name": "h", "capacity_ah": 100}, "batteries.charge", "no meters"),
    ({"name": "h", "capacity_ah": 100, "charge": ["a"], "voltage_sensor": "z"}, "batteries.voltage_sensor", "not one"),
    ({"name": "h", "capacity_ah": 100, "charge": ["a"], "charged_voltage_v": 9}, "batteries.charged_voltage_v",
     "does not suit the nominal 12 V"),
    ({"name": "h", "capacity_ah": 100, "charge": ["a"], "current_threshold_a": "0.1"},
     "batteries.current_threshold_a", "must be a number"),
    ({"name": "h", "capacity_ah": 100, "charge": "a"}, "batteries.charge", "must be a list"),
])
def test_from_dict_names_the_key_and_the_fix(data, key, text):
    with pytest.raises(ConfigError) as ei:
        BatterySettings.from_dict(data, "config.toml")
    assert ei.value.key == key and ei.value.file == "config.toml"
    assert text in str(ei.value) and ei.value.fix


def test_presets_and_overrides():
    s = BatterySettings.from_dict({"name": "boat", "capacity_ah": 400, "nominal_v": 24, "chemistry": "LiFePO4",
                                   "charge": ["solar"], "discharge": ["inverter", "dc"], "peukert": 1.02})
    assert s.charged_voltage_v == 28.0 and s.peukert == 1.02 and s.charge_efficiency_pct == 99
    assert s.tail_current_a == 16.0 and s.discharge_floor_pct == 10 and s.battery_voltage_sensor == "solar"
    a = BatterySettings.from_dict({"name": "a", "capacity_ah": 100, "nominal_v": 48, "charge": ["c"],
                                   "discharge": ["d"]})
    assert (a.charged_voltage_v, a.peukert, a.charge_efficiency_pct, a.discharge_floor_pct) == (52.8, 1.25, 95, 50)
    assert (a.current_threshold_a, a.ttg_window_min, a.charged_detection_min, a.tail_current_pct) == (0.1, 3, 3, 4)
    with pytest.raises(ConfigError, match=r"batteries\[1\]\.name.*used twice"):
        settings_list([{"name": "a", "capacity_ah": 1, "charge": ["c"]}] * 2)
    with pytest.raises(ConfigError, match="no sensor named 'x'"):
        settings_list([{"name": "a", "capacity_ah": 1, "charge": ["x"]}], sensors=["c"])


def test_one_meter_on_the_battery_cable_says_what_it_cannot_know():
    s = BatterySettings.from_dict({"name": "van", "capacity_ah": 100, "battery_cable": ["shunt"]})
    text = limits(s)
    assert "no sign" in text and "Not known: state of charge, time to go" in text
    mon = BatteryMonitor(s)
    t, e = 0.0, 0.0
    for _ in range(1000):
        t += 5
        e += 12.6 * 10 * 5 / 3600
        for v in (14.2, 12.4):                 # charging or discharging: the meter cannot tell
            mon.update("shunt", T0_NS + int(t * 1e9), t, {"voltage_v": v, "current_a": 10, "power_w": v * 10,
                                                         "energy_wh": math.floor(e)})
    st = mon.snapshot()
    assert st.soc_pct is None and st.time_to_go_s is None and st.current_a is None and st.status == "unknown"
    assert st.unknown_reason == text and st.charged_kwh == pytest.approx(e / 1000, abs=0.002)
    assert st.min_voltage_v == 12.4 and st.max_voltage_v == 14.2
    assert "only load meters" in limits(BatterySettings.preset("x", 100, discharge=["l"]))
    assert "only charge meters" in limits(BatterySettings.preset("x", 100, charge=["c"]))


def test_docs_show_the_limits_text_and_every_key():
    doc = (ROOT / "docs" / "battery.md").read_text()
    s = BatterySettings.from_dict({"name": "van", "capacity_ah": 100, "battery_cable": ["shunt"]})
    assert limits(s) in doc.replace("\n> ", " ").replace("\n", " ")
    from dataclasses import fields
    for f in fields(BatterySettings):
        assert f"`{f.name}`" in doc, f.name


# ------------------------------------------------------------------------------ the real simulator on a pty

def test_through_the_simulator_on_a_pty_with_real_bus_reads():
    """Two simulated PZEM-017s driven by the model on a clock 600× real time, read with Bus reads:
    register decoding and the counters' 1 Wh resolution are in the loop."""
    from dcmon.bus import Bus, BusSettings
    from dcmon.meter import read_values
    from dcmon.models import PZEM017
    from dcmon.simulator import SimMeter, Simulator

    speed = 600.0
    t0 = time.monotonic()

    def clock(now: float) -> float:
        return (now - t0) * speed

    model = BatteryModel(capacity_ah=5, soc=0.97, charger_max_a=1.5, load_a=0.3)   # 12 V, 5 Ah: 1 Wh ≈ 1.6 % SoC
    meters = [SimMeter(model=PZEM017, address=1, drive=model.drive("charge", clock)),
              SimMeter(model=PZEM017, address=2, drive=model.drive("load", clock))]
    s = BatterySettings.preset("sim", 5, charge=["charger"], discharge=["loads"])
    mon = BatteryMonitor(s)
    seen_unknown = False
    worst = 0.0
    steps = 0
    with Simulator(meters) as sim, Bus(BusSettings(name="sim", port=sim.path, timeout_s=0.5, gap_s=0.0)) as bus:
        phase_end = {"charge": None}
        while True:
            for name, addr in (("charger", 1), ("loads", 2)):
                vals = read_values(bus, PZEM017, addr)
                now = clock(time.monotonic())
                mon.update(name, T0_NS + int(now * 1e9), now, vals)
            steps += 1
            st = mon.snapshot()
            sim_t = clock(time.monotonic())
            if st.soc_pct is None:
                seen_unknown = True
                assert sim_t < 3 * 3600, "never synchronised on the pty"
                continue
            with model.lock:
                true = model.soc * 100
            worst = max(worst, abs(st.soc_pct - true))
            if phase_end["charge"] is None:          # synchronised: charger off, a constant load
                phase_end["charge"] = sim_t
                with model.lock:
                    model.charger_max_a, model.load_a = 0.0, 1.0
            elif sim_t - phase_end["charge"] > 3600:
                break
        vals = read_values(bus, PZEM017, 2)
    assert seen_unknown and steps > 100
    assert st.synchronisations == 1 and st.status == "discharging"
    assert 55 < st.soc_pct < 85
    assert worst < 2.0, f"worst {worst:.2f} % SoC"
    assert st.time_to_go_s == pytest.approx(model.time_to_floor_s(50.0), rel=0.10)
    assert vals["energy_wh"] == int(vals["energy_wh"]) and vals["energy_wh"] > 0


def test_state_fields_leave_unknowns_out_and_keep_types():
    mon = BatteryMonitor(lead())
    t = _hold(mon, 0, 60, 12.6, 0.0, 5.0)
    f = mon.snapshot().fields()
    assert "soc_pct" not in f and "time_to_go_s" not in f and f["soc_known"] is False
    assert f["status"] == "discharging" and isinstance(f["current_a"], float) and f["synchronisations"] == 0
    assert f["unknown_reason"] == "not synchronised yet"
    _hold(mon, t, 200, 14.0, 2.0, 0.0)
    f = mon.snapshot().fields()
    assert isinstance(f["soc_pct"], float) and f["synchronisations"] == 1 and "unknown_reason" not in f


def test_energy_reset_field_from_the_poller_is_honoured():
    rig = _rig_synced()
    rig.offline = True
    rig.run(600, check=False)                  # 10 min unread; the counter is reset and climbs past the old value
    rig.offline = False
    m = rig.m
    ns, mono = T0_NS + int(m.t_s * 1e9), m.t_s + rig.mono_offset
    rig.mon.update("charger", ns, mono, pzem_reading(*m.sample("charge")))
    vals = pzem_reading(*m.sample("load"))
    vals["energy_reset"] = True
    rig.mon.update("loads", ns, mono, vals)
    assert rig.mon.snapshot().soc_pct is None


def test_history_totals_never_step_back_and_still_add_up_to_the_net_flow():
    """Meters are read one after the other: while charging, the load meter's counter step arrives before the
    chargers' that outweighs it. The charged/discharged totals must only grow (a per-day increase sums
    them), and charged − discharged must still equal the net flow counted (here: the counters' net Wh)."""
    mon, t = _synced()
    e = [0.0, 0.0]
    seen = []
    # charging 5 A in, 2 A out; then discharging 1 A in, 6 A out; then charging again: counters step apart
    for i_in, i_out in ((5.0, 2.0), (1.0, 6.0), (4.0, 1.5)):
        for _ in range(int(1800 / 5)):
            t = _flow(mon, t, 5, 13.0, i_in, i_out, e)
            h = mon.h
            seen.append((h.charged_ah, h.discharged_ah, h.charged_wh, h.discharged_wh))
    for a, b in zip(seen, seen[1:]):
        assert all(y >= x for x, y in zip(a, b)), (a, b)
    h = mon.h
    net_wh = (e[0] - e[1])
    # what is still in the carry has been counted in neither total yet (at most one meter step: 1 Wh)
    assert h.charged_wh - h.discharged_wh + h.carry_wh == pytest.approx(net_wh, abs=2.0)
    # net 3 A then 2.5 A in for half an hour each at 13 V; net 5 A out for half an hour
    assert h.charged_wh == pytest.approx(13.0 * (3.0 + 2.5) / 2, abs=1.5)
    assert h.discharged_wh == pytest.approx(13.0 * 5.0 / 2, abs=1.5)


def test_the_simulate_demo_battery_synchronises_within_minutes_then_cycles():
    """`dcmon run --simulate` with [[batteries]]: the battery's meters follow a model that is nearly full with
    the charger on, so the state of charge becomes known a few minutes after the start (not hours), then
    the hourly charger-off stretch discharges it and time to go shows."""
    from dcmon.battery_sim import DEMO_CHARGE_S, demo_drives
    s = BatterySettings.preset("house", 100, "lead-acid", charge=["solar", "charger"], discharge=["loads"])
    drives = demo_drives(100, 12, "lead-acid", s.charge, s.discharge, start=1000.0)
    mon = BatteryMonitor(s)
    synced_at = None
    ttg_seen = False
    for k in range(1, int(3600 / 5)):
        now = 1000.0 + 5 * k
        for name, d in drives.items():
            v, i, e = d.sample(now)
            mon.update(name, T0_NS + int(now * 1e9), now, pzem_reading(v, i, e))
        st = mon.snapshot()
        if synced_at is None and st.soc_pct is not None:
            synced_at = 5 * k
        if 5 * k > DEMO_CHARGE_S + 600:
            assert st.status == "discharging" and st.time_to_go_s and st.time_to_go_s > 3600
            ttg_seen = True
    assert synced_at is not None and synced_at < 15 * 60, synced_at
    assert ttg_seen and 95 < mon.snapshot().soc_pct < 100
    assert drives["charger"].sample(2000.0)[1] == 0.0          # a second charge meter reads 0 A
