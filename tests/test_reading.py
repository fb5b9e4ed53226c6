"""Line-protocol encoding: escaping, types, and the schema the poller writes (checked against real influxd)."""

from __future__ import annotations

import httpx
import pytest

from dcmon.reading import encode_line, format_field


def test_escaping_of_measurement_tags_and_fields():
    line = encode_line("dc power,x", {"sensor": "van battery", "site": "a=b,c"}, {"note": 'say "hi"\\', "power_w": 1.5}, 7)
    assert line == r'dc\ power\,x,sensor=van\ battery,site=a\=b\,c note="say \"hi\"\\",power_w=1.5 7'


def test_field_types_are_stable():
    assert format_field(2.0) == "2.0"       # a float stays a float even when whole
    assert format_field(3) == "3i"
    assert format_field(True) == "true" and format_field(False) == "false"
    with pytest.raises(ValueError):
        format_field(float("nan"))


def test_empty_tag_values_are_left_out_and_fields_required():
    assert encode_line("m", {"a": "", "b": "1"}, {"f": 1.0}, 5) == "m,b=1 f=1.0 5"
    with pytest.raises(ValueError):
        encode_line("m", {}, {}, 1)


def test_tricky_names_round_trip_through_real_influxdb(influxd, fresh_db):
    tags = {"sensor": "van battery, aft", "site": "x=y"}
    line = encode_line("dc_power", tags, {"voltage_v": 12.5, "note": 'a "b"', "ok": True, "n": 3}, 1_700_000_000_000_000_000)
    r = httpx.post(f"{influxd.url}/write", params={"db": fresh_db, "precision": "ns"}, content=line)
    assert r.status_code == 204, r.text
    rows = influxd.query('SELECT * FROM dc_power', fresh_db)
    cols, vals = rows[0]["columns"], rows[0]["values"][0]
    got = dict(zip(cols, vals))
    assert got["sensor"] == "van battery, aft" and got["site"] == "x=y"
    assert got["voltage_v"] == 12.5 and got["note"] == 'a "b"' and got["ok"] is True and got["n"] == 3
    assert got["time"] == 1_700_000_000_000_000_000
