"""Debian's mbpoll (libmodbus, an independent Modbus RTU master) against our simulator on a real pty.

This proves the simulator speaks standard Modbus RTU, not just whatever pymodbus happens to accept: the
frames, CRC, exception replies and silences that mbpoll sees are what a real master would see. Values are
compared with what ``dcmon.bus`` reads from the same simulator moments later; measured values wander, so
those are compared within a tolerance, settings (holding registers) exactly.

mbpoll flags used (``mbpoll -h``): ``-m rtu``; ``-b 9600 -d 8 -P none``; ``-s`` stop bits; ``-a`` slave
address; ``-t 3`` input registers, ``-t 3:int`` 32-bit integers in input registers (little-endian word
order, i.e. low word first, unless ``-B``), ``-t 4`` holding registers; ``-r`` first reference, 1-based;
``-c`` count; ``-1`` poll once; ``-o`` timeout in seconds. Values to write follow the device path.
On a pty the stop-bit setting is not enforced by any hardware; it is passed as a real setup would.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from dcmon.bus import Bus, BusSettings
from dcmon.models import MODELS, decode
from dcmon.simulator import SimMeter, Simulator, meters_for

# "[7]: \t65535 (-1)": mbpoll adds the signed reading in brackets when the top bit is set
LINE = re.compile(r"^\[(\d+)\]:\s+(-?\d+)(?: \(-?\d+\))?\s*$", re.M)


@pytest.fixture(scope="module")
def mbpoll() -> str:
    path = shutil.which("mbpoll")
    if not path:
        pytest.fail("mbpoll not installed: apt-get install mbpoll (scripts/test.sh / .ci/run do this)")
    return path


def run_mbpoll(exe: str, port: str, *args: str, address: int = 1, stopbits: int = 2, timeout: float = 0.5,
               values: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "-m", "rtu", "-b", "9600", "-d", "8", "-s", str(stopbits), "-P", "none", "-a", str(address),
           "-1", "-o", f"{timeout:g}", *args, port, *map(str, values)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


def registers(proc: subprocess.CompletedProcess[str]) -> dict[int, int]:
    """mbpoll's ``[ref]: value`` lines as {1-based reference: value}; fails with mbpoll's own words."""
    assert proc.returncode == 0, f"mbpoll failed ({proc.returncode}): {proc.stderr.strip()}"
    found = {int(r): int(v) for r, v in LINE.findall(proc.stdout)}
    assert found, f"no values in mbpoll output:\n{proc.stdout}"
    return found


def words_of(found: dict[int, int], first: int, count: int) -> list[int]:
    return [found[first + i] & 0xFFFF for i in range(count)]


def bus_for(path: str, stopbits: int = 2) -> Bus:
    """A fresh Bus per use, closed afterwards, so that mbpoll and the bus never hold the pty at once."""
    return Bus(BusSettings(name="mbpoll", port=path, stopbits=stopbits, timeout_s=0.5, retries=0, gap_s=0.0))


def test_read_input_registers_matches_dcmon_bus(mbpoll, sim):
    found = registers(run_mbpoll(mbpoll, sim.path, "-t", "3", "-r", "1", "-c", "8"))
    assert sorted(found) == list(range(1, 9))
    theirs = decode(MODELS["pzem017"], words_of(found, 1, 8))
    with bus_for(sim.path) as bus:
        ours = decode(MODELS["pzem017"], bus.read_input_registers(1, 0, 8))
    assert 12.0 < theirs["voltage_v"] < 14.5
    assert theirs["voltage_v"] == pytest.approx(ours["voltage_v"], abs=0.05)
    assert theirs["current_a"] == pytest.approx(ours["current_a"], abs=0.2)
    assert theirs["energy_wh"] <= ours["energy_wh"]             # the counter only goes up
    assert theirs["high_voltage_alarm"] is ours["high_voltage_alarm"] is False
    assert theirs["low_voltage_alarm"] is ours["low_voltage_alarm"] is False


def test_second_meter_holding_registers_exact(mbpoll, sim):
    found = registers(run_mbpoll(mbpoll, sim.path, "-t", "4", "-r", "1", "-c", "4", address=2))
    with bus_for(sim.path) as bus:
        ours = bus.read_holding_registers(2, 0, 4)
    # factory defaults per the manual: 300.00 V, 7.00 V, its address, shunt code 0 (100 A)
    assert words_of(found, 1, 4) == ours == [30000, 700, 2, 0]


def test_write_threshold_with_mbpoll_then_read_back_both_ways(mbpoll, sim):
    """mbpoll writes the high-voltage threshold (function 06); the meter then raises its alarm, and
    both mbpoll and dcmon.bus see the new value and the alarm."""
    proc = run_mbpoll(mbpoll, sim.path, "-t", "4", "-r", "1", values=(1000,))   # 10.00 V, below 13.2 V
    assert proc.returncode == 0 and "Written 1 references" in proc.stdout, proc.stderr
    assert registers(run_mbpoll(mbpoll, sim.path, "-t", "4", "-r", "1", "-c", "1")) == {1: 1000}
    alarm = registers(run_mbpoll(mbpoll, sim.path, "-t", "3", "-r", "7", "-c", "1"))
    assert alarm[7] & 0xFFFF == 0xFFFF
    with bus_for(sim.path) as bus:
        assert bus.read_holding_registers(1, 0, 1) == [1000]
        assert decode(MODELS["pzem017"], bus.read_input_registers(1, 0, 8))["high_voltage_alarm"] is True
    assert sim.meter(2).holding[0] == 30000, "the write reached the wrong meter"


def test_write_out_of_range_is_refused(mbpoll, sim):
    proc = run_mbpoll(mbpoll, sim.path, "-t", "4", "-r", "1", values=(40000,))    # 400 V > 350 V maximum
    assert proc.returncode != 0
    assert "Illegal data value" in proc.stderr
    assert sim.meter(1).holding[0] == 30000


def test_unserved_address_times_out(mbpoll, sim):
    proc = run_mbpoll(mbpoll, sim.path, "-t", "3", "-r", "1", "-c", "8", address=9, timeout=0.2)
    assert proc.returncode != 0
    assert "timed out" in proc.stderr
    assert not LINE.search(proc.stdout)


@pytest.mark.parametrize("count", [9, 10])
def test_reading_past_the_map_is_exception_02(mbpoll, sim, count):
    proc = run_mbpoll(mbpoll, sim.path, "-t", "3", "-r", "1", "-c", str(count))
    assert proc.returncode != 0
    assert "Illegal data address" in proc.stderr


def test_32bit_power_low_word_first_read_by_mbpoll(mbpoll):
    """mbpoll's own 32-bit decoding (-t 3:int, low word first) of power and energy at 0x0002..0x0005 agrees
    with dcmon's. The meter runs at ~25 kW so the high word is not zero and word order matters."""
    big = SimMeter(model=MODELS["pzem017"], address=1, base_voltage_v=250.0, base_current_a=100.0)
    with Simulator([big]) as s:
        found = registers(run_mbpoll(mbpoll, s.path, "-t", "3:int", "-r", "3", "-c", "2"))
        with bus_for(s.path) as bus:
            ours = decode(MODELS["pzem017"], bus.read_input_registers(1, 0, 8))
    power_w = found[3] * 0.1
    assert power_w > 6553.5, "power too small to exercise the high word"
    assert power_w == pytest.approx(ours["power_w"], rel=0.05)
    assert found[5] <= ours["energy_wh"]


def test_ac_meter_at_8n1(mbpoll):
    """A PZEM-004T simulator read by mbpoll at 9600 8N1 (-s 1), compared with dcmon.bus at 8N1."""
    with Simulator(meters_for([("pzem004t", 1)])) as s:
        found = registers(run_mbpoll(mbpoll, s.path, "-t", "3", "-r", "1", "-c", "10", stopbits=1))
        holding = registers(run_mbpoll(mbpoll, s.path, "-t", "4", "-r", "2", "-c", "2", stopbits=1))
        with bus_for(s.path, stopbits=1) as bus:
            ours = decode(MODELS["pzem004t"], bus.read_input_registers(1, 0, 10))
            ours_holding = bus.read_holding_registers(1, 1, 2)
        too_many = run_mbpoll(mbpoll, s.path, "-t", "3", "-r", "1", "-c", "11", stopbits=1)
    theirs = decode(MODELS["pzem004t"], words_of(found, 1, 10))
    assert 220.0 < theirs["voltage_v"] < 240.0
    assert theirs["voltage_v"] == pytest.approx(ours["voltage_v"], abs=0.5)
    assert theirs["frequency_hz"] == ours["frequency_hz"] == 50.0
    assert theirs["power_factor"] == ours["power_factor"] == 1.0
    assert theirs["power_alarm"] is ours["power_alarm"] is False
    assert words_of(holding, 2, 2) == ours_holding == [23000, 1]       # power alarm threshold, address
    assert too_many.returncode != 0 and "Illegal data address" in too_many.stderr
