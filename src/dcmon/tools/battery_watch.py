"""``dcmon watch --battery NAME``: one battery's state of charge, net current, voltage, time to go and Ah
consumed, one line per refresh (``dcmon.tools.meter`` adds the option and hands the command over here).

Two sources, chosen again at every refresh, so that watch never fights the service for the serial port:

- **The service runs** (its status record is fresh and says "running": the lookup and the verdict of
  `dcmon status`, ``dcmon.service.status_path`` and ``dcmon.service_cli.assess``): the port is the service's, so
  watch *follows* it. It reads the battery's entry under ``"batteries"`` in status.json (and whether its meters
  are up under ``"sensors"``) and prints a line for each new record (the service writes one every 5 s), at
  most one per interval. It opens no port.
- **The service does not run**: watch opens the battery's meters itself (on one bus or several: the same
  ``Bus`` and ``read_values`` as ``dcmon read``, the sensor's calibration applied as the poller does) and
  feeds a ``BatteryMonitor`` restored from the service's saved state, ``battery.sqlite``, READ-ONLY (from a
  copy: see ``saved_state``): the service owns that file, watch never writes it or anything beside it. It says once where the state of
  charge comes from, and that it is not saved. A meter that does not answer is named in the line; watch
  goes on.

A service that stops while watch follows it may only be restarting (systemctl restart): watch waits
``RESTART_GRACE_S`` before it takes the port, so that the service finds the port free when it comes back;
a service that starts while watch holds the port gets it back at watch's next refresh (its first polls
fail with "in use" until then).
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config as config_mod
from ..battery import BatteryMonitor, BatterySettings
from ..battery_service import fit_to_interval, headline, status_entry
from ..battery_store import APPLICATION_ID, store_path
from ..calibration import apply_calibration
from ..errors import BusError, ConfigError, DcmonError, DeviceError, UsageError
from ..meter import read_values
from .target import next_tick, note

if TYPE_CHECKING:
    from ..config import Config, SensorConfig

RESTART_GRACE_S = 10.0   # a service that stopped this recently may be restarting: leave it the port

# the meter options that name a port or a meter: --battery takes its meters and buses from the config
_METER_OPTIONS = (("sensor", "--sensor"), ("address", "--address"), ("port", "--port"), ("bus", "--bus"),
                  ("model", "--model"), ("baudrate", "--baudrate"), ("stopbits", "--stopbits"))


# ------------------------------------------------------------------------------------ which battery

def pick_battery(cfg: Config, name: str | None, how: str = "--battery NAME") -> BatterySettings:
    """The battery named (or the only one); ConfigError naming the configured ones otherwise. ``how``: how
    the command line names one."""
    names = [b.name for b in cfg.batteries]
    if not names:
        raise ConfigError(cfg.source, "batteries", "no batteries configured",
                          "add a [[batteries]] table naming its charge and discharge meters (docs/battery.md)")
    if name is None:
        if len(names) == 1:
            return cfg.batteries[0]
        raise UsageError(f"which battery? give {how} (batteries in {cfg.source}: {', '.join(names)})")
    for b in cfg.batteries:
        if b.name == name:
            return b
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(cfg.source, "batteries", f"no battery named {name!r}",
                      f"{hint}batteries: {', '.join(names)}")


def check_options(args: argparse.Namespace) -> None:
    given = [opt for attr, opt in _METER_OPTIONS if getattr(args, attr, None) is not None]
    if "--sensor" in given or "--address" in given:
        raise UsageError("give --battery NAME (a battery) or --sensor NAME / --address N (one meter), not both")
    if given:
        raise UsageError(f"--battery takes its meters and their buses from the config: leave out {', '.join(given)}")


# ------------------------------------------------------------------------------------ the service

def service_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the status record, "") while the service runs; (None, why not) otherwise. A status this user may not
    read is one line (DcmonError): watch cannot tell whether the service holds the port."""
    from ..service_cli import STATUS_CRITICAL, assess, read_record

    try:
        data = read_record(path)
    except FileNotFoundError:
        return None, f"no status at {path}"
    except PermissionError:
        raise DcmonError(f"cannot read {path}: permission denied, so watch cannot tell whether the service holds "
                         f"the serial port; run `sudo dcmon watch --battery NAME`, or join the dcmon group "
                         f"(sudo usermod -aG dcmon $USER, then log in again)") from None
    except (OSError, ValueError) as e:
        return None, f"cannot read the status {path}: {getattr(e, 'strerror', None) or e}"
    code, problems = assess(data)
    if code == STATUS_CRITICAL:   # stopped, killed, hung: its first sentence (the fix is to start it: not ours)
        return None, problems[0].split("; ")[0] if problems else "not running"
    return data, ""


def _record_problems(rec: Mapping[str, Any], bat: BatterySettings) -> list[str]:
    """What the service says about this battery's meters: down, or their bus failing."""
    from ..service_cli import down_reason

    out = []
    sensors, buses = rec.get("sensors") or {}, rec.get("buses") or {}
    for name in bat.sensors:
        s = sensors.get(name)
        if isinstance(s, Mapping) and (why := down_reason(s, buses if isinstance(buses, Mapping) else {})) is not None:
            out.append(f"sensor {name!r} down: {why}")
    return out


# ------------------------------------------------------------------------------ the saved state, read-only

def saved_state(path: Path, battery: str) -> tuple[dict[str, Any] | None, str]:
    """The service's saved state of one battery, read without touching the service's files: (state, "") or
    (None, why there is none).

    The file and its write-ahead log are copied to a temporary folder and the copy is opened. Opening the
    file itself, even with SQLite's ``mode=ro``, creates ``-wal`` and ``-shm`` files beside it when they are
    missing (root's, under sudo: the service, another user, could then no longer write its state), and fails
    outright in a folder this user may not write."""
    try:
        path.stat()
    except FileNotFoundError:
        return None, f"no saved state at {path} (the service has not run with this battery yet)"
    except OSError as e:
        return None, f"cannot read the saved state {path}: {e.strerror}"
    with tempfile.TemporaryDirectory(prefix="dcmon-watch-") as tmp:
        copy = Path(tmp) / path.name
        try:
            shutil.copyfile(path, copy)
            wal = path.with_name(path.name + "-wal")
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        except PermissionError:
            return None, (f"cannot read the saved state {path}: permission denied (run watch as the service's "
                          f"user, or with sudo)")
        except OSError as e:
            return None, f"cannot read the saved state {path}: {e.strerror}"
        try:
            db = sqlite3.connect(copy, timeout=1.0)
            try:
                if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                    return None, f"{path} is not a dcmon battery state"
                row = db.execute("SELECT data FROM state WHERE battery = ?", (battery,)).fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            return None, f"cannot read the saved state {path}: {e}"
    if row is None:
        return None, f"no saved state for battery {battery!r} in {path}"
    try:
        data = json.loads(row[0])
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None, f"the saved state of battery {battery!r} in {path} is unreadable"
    return data, ""


def _clock(ns: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ns) / 1e9))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


# ------------------------------------------------------------------------------------ the meters

class Direct:
    """The battery's meters read by watch itself, feeding a monitor restored read-only from the saved state."""

    def __init__(self, cfg: Config, bat: BatterySettings, *, timeout_s: float | None, strict: bool) -> None:
        from dataclasses import replace

        from ..bus import Bus

        self.bat = bat
        self.sensors: list[SensorConfig] = []
        by_name = {s.name: s for s in cfg.sensors}
        for name in bat.sensors:
            s = by_name[name]   # the config checked that every meter named is a sensor
            if s.enabled:
                self.sensors.append(s)
            else:
                note(f"sensor {name!r} is disabled in {cfg.source} (enabled = false): the service does not read it, "
                     f"and neither does watch")
        self.buses: dict[str, Bus] = {}
        for s in self.sensors:
            if s.bus not in self.buses:
                settings = cfg.bus_settings(s.bus)
                if timeout_s:
                    settings = replace(settings, timeout_s=timeout_s)
                self.buses[s.bus] = Bus(settings)
        path = store_path(cfg)
        state, why = saved_state(path, bat.name)
        self.monitor = BatteryMonitor.restore(bat, state, time.time_ns())
        if state is not None:
            note(f"battery {bat.name!r}: the state of charge comes from the service's saved state of "
                 f"{_clock(state.get('saved_ns'))} ({path}) and the meters' counters since; watch does not save it")
        else:
            note(f"battery {bat.name!r}: {why}: the state of charge is unknown until the next full charge; "
                 f"watch does not save it")
        if strict:   # at start: a port that cannot be opened (missing, busy, not permitted) is the answer
            try:
                for bus in self.buses.values():
                    bus.open()
            except BaseException:
                self.close()
                raise

    def read(self) -> list[str]:
        """Read every meter once and feed the monitor; the problems, one per meter that did not answer."""
        problems = []
        for s in self.sensors:
            bus = self.buses[s.bus]
            try:
                values = read_values(bus, s.meter, s.address)
            except (BusError, DeviceError) as e:
                problems.append(f"sensor {s.name!r}: {e}")
                continue
            t_ns, mono = time.time_ns(), time.monotonic()
            if not s.calibration.is_identity:
                values = apply_calibration(values, s.calibration, s.meter)
            self.monitor.update(s.name, t_ns, mono, values)
        for event in self.monitor.drain_events():
            note(f"{event} (seen by watch; not saved)")
        return problems

    def entry(self) -> dict[str, Any]:
        """The battery's state in the shape of status.json's ``"batteries"`` entries."""
        return status_entry(self.monitor.snapshot(time.time_ns(), time.monotonic()), self.bat)

    def close(self) -> None:
        for bus in self.buses.values():
            bus.close()


# ------------------------------------------------------------------------------------------ the line

def battery_line(name: str, b: Mapping[str, Any], stamp: str, problems: list[str] | None = None) -> str:
    """``HH:MM:SS battery NAME: SoC …, status ±A V, time to go …, Ah consumed`` (+ what failed)."""
    used = b.get("consumed_ah")
    used_text = f"{used:.2f} Ah consumed" if isinstance(used, (int, float)) else "Ah consumed -"
    line = f"{stamp} battery {name}: {headline(name, b)}, {used_text}"
    return line + "".join(f"; {p}" for p in problems or [])


# ------------------------------------------------------------------------------------------ the loop

def watch_battery(args: argparse.Namespace, cfg: Config | None = None) -> int:
    """The command (see the module docstring): lines until Ctrl-C (exit 0) or ``--count`` lines."""
    from ..service import status_path

    check_options(args)
    cfg = cfg or config_mod.load(args.config)
    bat = fit_to_interval(pick_battery(cfg, args.battery), args.interval)   # stale only after 3 missed reads
    spath = status_path(cfg)
    tty = sys.stdout.isatty()
    printed = 0
    mode = ""                       # "follow" | "direct" | "" (not decided yet)
    direct: Direct | None = None
    last_record: object = None
    stopped_at: float | None = None  # monotonic: when the followed service was first seen not running

    def out(line: str) -> None:
        nonlocal printed
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        printed += 1

    try:
        next_at = time.monotonic()
        while args.count is None or printed < args.count:
            rec, why = service_record(spath)
            if rec is not None:
                if stopped_at is not None and mode == "follow":
                    note(f"the service is running again (pid {rec.get('pid')}): following it")
                stopped_at = None
                entry = (rec.get("batteries") or {}).get(bat.name)
                if not isinstance(entry, Mapping):
                    raise DcmonError(f"the running service (pid {rec.get('pid')}) has no battery {bat.name!r}: it "
                                     f"was started before the battery was configured; restart it "
                                     f"(sudo systemctl restart dcmon), then watch again")
                if mode != "follow":
                    if direct is not None:
                        direct.close()
                        direct = None
                        note(f"the service is running (pid {rec.get('pid')}): the port is its again; following its "
                             f"status")
                    elif not mode:
                        note(f"following the running service (pid {rec.get('pid')}, {spath}): the serial port is "
                             f"its, so watch shows its state, a line per status update (every 5 s)")
                    mode, last_record = "follow", None
                if rec.get("time") != last_record:   # a new record: the service writes one every 5 s
                    last_record = t = rec.get("time")
                    stamp = time.strftime("%H:%M:%S", time.localtime(float(t) if isinstance(t, (int, float))
                                                                     else time.time()))
                    out(battery_line(bat.name, entry, stamp, _record_problems(rec, bat)))
            else:
                now = time.monotonic()
                if mode == "follow":
                    if stopped_at is None:
                        stopped_at = now
                        note(f"the service is not running any more ({why}); watch reads the meters itself in "
                             f"{RESTART_GRACE_S:g} s unless it comes back")
                    if now - stopped_at >= RESTART_GRACE_S:
                        mode = "direct"
                elif not mode:
                    note(f"the service is not running ({why}): watch reads the battery's meters itself")
                    mode = "direct"
                    direct = Direct(cfg, bat, timeout_s=args.timeout, strict=True)
                if mode == "direct":
                    if direct is None:
                        direct = Direct(cfg, bat, timeout_s=args.timeout, strict=False)
                    problems = direct.read()
                    out(battery_line(bat.name, direct.entry(), time.strftime("%H:%M:%S"), problems))
            if args.count is not None and printed >= args.count:
                break
            next_at = next_tick(next_at, args.interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
    finally:
        if direct is not None:
            direct.close()
    return 0


__all__ = ["RESTART_GRACE_S", "battery_line", "pick_battery", "saved_state", "service_record", "watch_battery"]
