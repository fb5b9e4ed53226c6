"""`dcmon influx-setup` on a real influxd: what it creates, that a second run changes nothing, that a
changed config is applied; and the backfill: readings the spool delivers after a real outage (influxd
stopped and started again) are downsampled, checked against the raw data.
"""

from __future__ import annotations

import threading
import time

import pytest

from dcmon import config
from dcmon.cli import main
from dcmon.outputs.influx import InfluxSink
from dcmon.influx_setup import HOUR_RP, META_RP, MINUTE_RP, Backfill, Influx, flux_tasks, setup
from dcmon.reading import encode_line
from dcmon.sender import Sender
from dcmon.spool import Spool

CFG = """
[poller]
host = "pi1"

[influxdb]
url = "{url}"
database = "{db}"
raw_days = {raw}
low_voltage_v = {{ battery = 11.5 }}
"""


def make_cfg(tmp_path, url, db, raw=90):
    (tmp_path / "config.toml").write_text(CFG.format(url=url, db=db, raw=raw))
    return config.load(tmp_path / "config.toml", env={})


def rps(influxd, db):
    (s,) = influxd.query(f'SHOW RETENTION POLICIES ON "{db}"', db=db)
    return {v[0]: v[1] for v in s["values"]}


def cqs(influxd, db):
    return sorted(v[0] for s in influxd.query("SHOW CONTINUOUS QUERIES", db=db) if s["name"] == db
                  for v in s.get("values", []))


def test_setup_creates_everything_and_a_second_run_changes_nothing(influxd, tmp_path, capsys):
    db = "t_setup_idem"
    influxd.drop_db(db)
    path = tmp_path / "config.toml"
    make_cfg(tmp_path, influxd.url, db)
    assert main(["influx-setup", "-c", str(path)]) == 0
    first = capsys.readouterr().out
    assert "created database" in first and "continuous query dcmon_dc_power_1m_energy" in first
    assert rps(influxd, db) == {"autogen": "2160h0m0s", MINUTE_RP: "17520h0m0s", HOUR_RP: "0s", META_RP: "0s"}
    assert cqs(influxd, db) == sorted([f"dcmon_{m}_{k}" for m in ("dc_power", "ac_power")
                                       for k in ("1m_stats", "1m_energy", "1h")] + ["dcmon_battery_1m", "dcmon_battery_1h"])
    assert main(["influx-setup", "-c", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("already set up, nothing changed")
    make_cfg(tmp_path, influxd.url, db, raw=30)                     # a changed period is applied
    assert main(["influx-setup", "-c", str(path)]) == 0
    assert "autogen (raw): 720h" in capsys.readouterr().out
    assert rps(influxd, db)["autogen"] == "720h0m0s"
    th = influxd.query(f'SELECT * FROM "{META_RP}"."dcmon_thresholds"', db=db)
    assert th[0]["values"][0][1:] == ["pi1", 11.5, "battery"]
    influxd.drop_db(db)


def test_unreachable_influxdb_is_one_line(tmp_path, capsys):
    make_cfg(tmp_path, "http://127.0.0.1:9", "x")
    assert main(["influx-setup", "-c", str(tmp_path / "config.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is InfluxDB running?" in err[0]


def test_flux_equivalent_is_printed(tmp_path):
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9", "dcmon")
    text = flux_tasks(cfg)
    assert 'option task = {name: "dcmon_dc_power_1m"' in text and 'to(bucket: "dcmon_1m")' in text
    assert "r.count" in text                        # the reset's new count


def minute_energy(influxd, db):
    out = {}
    for s in influxd.query(f'SELECT "energy_inc_wh" FROM "{MINUTE_RP}"."dc_power" WHERE "energy_inc_wh" > 0', db=db):
        out.update({v[0]: v[1] for v in s["values"]})
    return out


def test_backlog_after_a_real_outage_is_downsampled(own_influxd, tmp_path, caplog):
    """influxd is stopped; two hours of readings (every 30 s, a counter reset in the middle) wait in the real
    spool; influxd starts again, the real sender drains the spool and calls the backfill, which writes the
    1-minute and 1-hour series. Each minute's energy equals the sum of that minute's increases in the raw data."""
    db = "dcmon"
    cfg = make_cfg(tmp_path, own_influxd.url, db)
    with Influx(cfg.influxdb) as api:
        setup(cfg, api, say=lambda _l: None)
    own_influxd.stop()
    spool = Spool.open(tmp_path / "spool.sqlite", max_bytes=64 * 2**20, max_age_s=86400)
    backfill = Backfill(cfg)
    sender = Sender(spool, backfill.watch(InfluxSink(cfg.influxdb)), min_backoff_s=0.1, max_backoff_s=0.2, on_backlog_sent=backfill)
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    thread.start()
    now = time.time_ns()
    start = now - 2 * 3600 * 10**9
    truth: dict[int, float] = {}
    e = 1000.0
    lines = []
    for i in range(240):
        t = start + i * 30 * 10**9
        reset = i == 120
        inc = 7.0 if reset else (2.5 if i else 0.0)
        e = 7.0 if reset else e + inc
        if i:
            truth[t // 60_000_000_000 * 60_000_000_000] = truth.get(t // 60_000_000_000 * 60_000_000_000, 0) + inc
        lines.append(encode_line("dc_power", {"host": "pi1", "sensor": "battery", "bus": "b"},
                                 {"voltage_v": 12.0 + i % 5, "energy_wh": e, "energy_reset": reset}, t))
    spool.put(lines)
    sender.poke()
    deadline = time.monotonic() + 10
    while sender.send_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sender.send_failures > 0, "the outage did not happen"
    own_influxd.start()
    deadline = time.monotonic() + 60
    while (backfill.runs == 0 or spool.stats().depth) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    sender.poke()
    thread.join(timeout=10)
    backfill.thread.join(timeout=30)
    spool.close()
    assert backfill.runs == 1, "no backfill after the drain"
    assert own_influxd.count("dc_power", db=db) == 240
    got = minute_energy(own_influxd, db)
    assert got == pytest.approx({t: v for t, v in truth.items() if v}), "1-minute energy differs from the raw data"
    hourly = own_influxd.query(f'SELECT sum("energy_inc_wh"), min("voltage_v_min"), max("voltage_v_max") '
                               f'FROM "{HOUR_RP}"."dc_power"', db=db)
    assert hourly[0]["values"][0][1:] == pytest.approx([sum(truth.values()), 12.0, 16.0])
    assert any("downsampled the" in r.message for r in caplog.records)


def test_the_watched_sink_answers_the_senders_probe(influxd, tmp_path):
    """The sender pings its sink during a back-off to retry as soon as InfluxDB is back; the sink the service
    uses is wrapped by the backfill, and the wrapper had no ping (every probe said "down"; mypy found it)."""
    from dcmon.outputs.influx import InfluxSink
    from dcmon.influx_setup import Backfill

    cfg = make_cfg(tmp_path, influxd.url, "probe")
    sink = Backfill(cfg).watch(InfluxSink(cfg.influxdb))
    try:
        assert sink.ping() is True
    finally:
        sink.close()
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9", "probe")     # nothing listens on the discard port
    sink = Backfill(cfg).watch(InfluxSink(cfg.influxdb))
    try:
        assert sink.ping() is False
    finally:
        sink.close()
