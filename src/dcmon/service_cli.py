"""The service's commands: `dcmon run`, `check-config`, `simulate` and `status` (the job itself: dcmon.service)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from .config import Config, SensorConfig, load
from .errors import ConfigError, DcmonError
from .helptext import Formatter
from .service import _probe, run, service_status_path, simulated_meters, status_path


def _setup(args: argparse.Namespace, cli: dict[str, tuple[str, object]] | None = None) -> Config:
    cfg = load(args.config, cli=cli)
    level = args.log_level or cfg.poller.log_level
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    return cfg


def _owner_of(path: Path) -> tuple[int, int] | None:
    """The uid and gid owning ``path``, or its nearest existing folder; None when nothing can be looked at."""
    for p in (path, *path.parents):
        try:
            st = p.stat()
            return st.st_uid, st.st_gid
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def cmd_run(args: argparse.Namespace) -> int:
    # command-line overrides go through the config's own validation (a range, and nan/inf refused)
    cfg = _setup(args, {"poller.interval_s": ("--interval", args.interval)} if args.interval is not None else None)
    echo = args.print if args.print is not None else (sys.stdout.isatty() or args.simulate or args.once)
    return run(cfg, simulate=args.simulate, once=args.once, echo=echo, hint_simulate=not args.simulate,
               test=args.test)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    cfg.require_sensors()
    note = ""
    try:
        cfg.check_spool()
    except ConfigError as e:
        owner, group = _owner_of(cfg.resolve(cfg.spool.path)) or (None, None)
        if owner is None or owner == os.geteuid() or group not in {os.getegid(), *os.getgroups()}:
            raise
        # the service's spool, looked at by a member of its group: may check the file, not write the spool
        import pwd

        name = pwd.getpwuid(owner).pw_name if owner in {p.pw_uid for p in pwd.getpwall()} else str(owner)
        note = f"note: {e.problem}; it belongs to {name}: `sudo -u {name} dcmon check-config` checks it as the service"
    print("\n".join(cfg.describe()))
    if note:
        print(note)
    print(f"{cfg.source}: ok")
    return 0


def _simulate_what(args: argparse.Namespace) -> list[tuple[str | None, list, list[SensorConfig | None]]]:
    """What `dcmon simulate` serves: the meters given (--model/--address), else the configuration's (one pty per
    bus), else one PZEM-017 at address 1. Each: (bus name, SimMeters, the sensor each one is)."""
    from .simulator import meters_for

    if args.model or args.address:
        addrs = args.address or [1]
        model = args.model or "pzem017"
        meters = meters_for([(model, a) for a in addrs], steady=args.steady)
        if args.shunt_code and meters[0].model.shunt_codes:
            for m in meters:
                m.holding[0x0003] = m.model.shunt_codes[args.shunt_code]
        return [(None, meters, [None] * len(meters))]
    found = _probe(Path(args.config))
    if found is False:
        print(f"no configuration at {args.config}: serving one PZEM-017 at address 1", file=sys.stderr)
        cfg = None
    else:
        cfg = load(args.config)  # unreadable or invalid: one line saying so (exit 2)
    if cfg is None or not cfg.enabled_sensors():
        if cfg is not None:
            print(f"no enabled sensors in {cfg.source}: serving one PZEM-017 at address 1", file=sys.stderr)
        meters = meters_for([("pzem017", 1)], steady=args.steady)
        if args.shunt_code:
            meters[0].holding[0x0003] = meters[0].model.shunt_codes[args.shunt_code]
        return [(None, meters, [None])]
    out: list[tuple[str | None, list, list[SensorConfig | None]]] = []
    for name in cfg.buses:
        sensors = cfg.enabled_sensors(name)
        if sensors:
            out.append((name, simulated_meters(sensors, steady=args.steady, shunt_code=args.shunt_code), list(sensors)))
    return out


def _describe_meter(m: object, sensor: SensorConfig | None, steady: bool) -> str:
    model = m.model  # type: ignore[attr-defined]
    extra = [f"sensor {sensor.name!r}"] if sensor else []
    if model.shunt_codes:
        amps = model.shunt_amps(m.holding.get(0x0003, 0))  # type: ignore[attr-defined]
        extra.append(f"shunt code {amps} A" + (f" on a {m.true_shunt_a} A shunt" if amps != m.true_shunt_a else ""))  # type: ignore[attr-defined]
    if steady:
        v = m.values()  # type: ignore[attr-defined]
        extra.append(f"steady {float(v['voltage_v']):.2f} V {float(v['current_a']):.2f} A")
    return f"{model.title} at address {m.address}" + (f" ({', '.join(extra)})" if extra else "")  # type: ignore[attr-defined]


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve simulated meters on a pty until interrupted; print what is served where, and how to use it."""
    from .simulator import Simulator

    served = _simulate_what(args)
    sims: list[Simulator] = []
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for bus, meters, sensors in served:
            link = args.link if not args.link or len(served) == 1 else f"{args.link}-{bus}"
            try:
                sim = Simulator(meters, timing=args.timing, turnaround_s=args.turnaround, link=link).start()
            except OSError as e:
                raise DcmonError(f"cannot make the link {link}: {e.strerror}; choose a path in a folder you may "
                                 f"write (e.g. --link /tmp/pzem)") from None
            sims.append(sim)
            where = sim.link or sim.path
            first = meters[0]
            framing = f"{first.model.serial.baudrate} {first.model.serial.bytesize}{first.model.serial.parity}{first.model.serial.stopbits}"
            what = ", ".join(_describe_meter(m, s, args.steady) for m, s in zip(meters, sensors))
            print(f"{where}  {'bus ' + repr(bus) + ', ' if bus else ''}{framing}: {what}", flush=True)
        bus0, meters0, _ = served[0]
        where0 = sims[0].link or sims[0].path
        model_opt = "" if meters0[0].model.name == "pzem017" else f" --model {meters0[0].model.name}"
        print(f"try: dcmon read --port {where0} --address {meters0[0].address}{model_opt}   "
              f"(or `dcmon run --simulate`, which simulates the configured meters by itself); Ctrl-C stops",
              flush=True)
        stop.wait()
    finally:
        for sim in sims:
            sim.stop()
    return 0


# `dcmon status` exit codes, as monitoring plugins report them (Nagios, Icinga, Telegraf `exec`, cron, Home
# Assistant `command_line`): docs/troubleshooting.md#dcmon-status-as-a-health-check.
STATUS_OK, STATUS_WARNING, STATUS_CRITICAL, STATUS_UNKNOWN = 0, 1, 2, 3
_VERDICT = {STATUS_OK: "OK", STATUS_WARNING: "WARNING", STATUS_CRITICAL: "CRITICAL", STATUS_UNKNOWN: "UNKNOWN"}
STATUS_MAX_AGE_S = 30.0        # the poller rewrites it every 5 s
STATUS_MAX_BACKLOG_S = 600.0   # readings older than this still waiting for InfluxDB


def _pid_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except PermissionError:
        pass                  # there, and someone else's (the service runs as dcmon)
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    try:   # killed but not yet reaped by its parent (a zombie) is not running either
        with open(f"/proc/{int(pid)}/stat", "rb") as f:   # type: ignore[call-overload]
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _clock(t: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


def read_record(path: Path) -> dict:
    """status.json as a dict; OSError (missing, not permitted, ...) or ValueError (not a JSON object): the
    callers say what each means for them."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def down_reason(s: Mapping[str, Any], buses: Mapping[str, Any]) -> str | None:
    """Why a sensor of the status record is down (its last error, or its bus's), or None while it is up."""
    bus_error = (buses.get(str(s.get("bus"))) or {}).get("error", "")
    return (s.get("last_error") or bus_error) if s.get("up") is False or bus_error else None


def assess(data: dict, *, now: float | None = None, max_age_s: float = STATUS_MAX_AGE_S,
           max_backlog_s: float = STATUS_MAX_BACKLOG_S) -> tuple[int, list[str]]:
    """The verdict on a status record: (exit status, problems). Not running (stopped, a dead pid, a stale
    status) is CRITICAL; running with a sensor down, an old backlog or a battery at its floor is WARNING."""
    now = time.time() if now is None else now
    pid = data.get("pid")
    age = now - float(data.get("time") or 0)
    if data.get("state") == "stopped":
        return STATUS_CRITICAL, [f"the poller stopped cleanly at {_clock(data.get('time'))}; start it: "
                                 f"sudo systemctl start dcmon"]
    if not _pid_alive(pid):
        return STATUS_CRITICAL, [f"the poller (pid {pid}) is not running: killed or crashed "
                                 f"(journalctl -u dcmon -n 30 says why)"]
    if age > max_age_s:
        return STATUS_CRITICAL, [f"the status is {age:.0f} s old (more than {max_age_s:g} s): the poller is hung "
                                 f"(journalctl -u dcmon -n 30)"]
    problems = []
    buses = data.get("buses") or {}
    for name, s in (data.get("sensors") or {}).items():
        if (why := down_reason(s, buses)) is not None:
            problems.append(f"sensor {name!r} is down: {why}")
    sp = data.get("spool") or {}
    oldest = sp.get("oldest_time_ns")
    if data.get("influxdb_enabled", True) and oldest:
        backlog = now - float(oldest) / 1e9
        if backlog > max_backlog_s:
            why = data.get("sender_error") or "InfluxDB has not taken them"
            problems.append(f"{sp.get('depth', 0)} reading(s) wait in the spool, the oldest {backlog / 60:.0f} min "
                            f"old: {why}")
    for name, b in (data.get("batteries") or {}).items():   # Victron's SoC alarm: at or below the floor
        soc, floor = (b.get("soc_pct"), b.get("discharge_floor_pct")) if isinstance(b, dict) else (None, None)
        if isinstance(soc, (int, float)) and isinstance(floor, (int, float)) and soc <= floor:
            problems.append(f"battery {name!r} is at {soc:.1f} %, at or below its discharge floor ({floor:g} %): "
                            f"charge it")
    for name, o in (data.get("outputs") or {}).items():   # the other durable outputs' own spools (MQTT stream)
        if name == "influxdb" or not isinstance(o, dict) or not o.get("oldest_time_ns") or not o.get("sending", True):
            continue
        backlog = now - float(o["oldest_time_ns"]) / 1e9
        if backlog > max_backlog_s:
            problems.append(f"{o.get('depth', 0)} reading(s) wait for {name} in {o.get('spool', 'its spool')}, the "
                            f"oldest {backlog / 60:.0f} min old: {o.get('last_error') or 'not delivered'}")
    return (STATUS_WARNING if problems else STATUS_OK), problems


def _status_verdict(code: int, problems: list[str], data: dict | None = None) -> str:
    if code == STATUS_OK and data is not None:
        sensors = data.get("sensors") or {}
        up = sum(1 for s in sensors.values() if s.get("up"))
        depth = (data.get("spool") or {}).get("depth", 0)
        return (f"DCMON OK: poller pid {data.get('pid')} running, {up} of {len(sensors)} sensor(s) up, "
                f"{depth} reading(s) queued")
    return f"DCMON {_VERDICT[code]}: " + "; ".join(problems)


def cmd_status(args: argparse.Namespace) -> int:
    """The report, then its verdict as the exit status, also when the reader stops early (`dcmon status |
    head -1`): the verdict is the command's answer, the text only its explanation."""
    lines: list[str] = []
    code = _status_report(args, lines.append)
    try:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:
        from .cli import discard_stdout

        discard_stdout()
    return code


def _status_report(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    path = service_status_path() or status_path(load(args.config))
    problem = ""
    try:
        data = read_record(path)
    except FileNotFoundError:
        code, problem = STATUS_CRITICAL, (f"no status at {path}: the poller is not running "
                                          f"(systemctl status dcmon; or start it: sudo systemctl start dcmon)")
    except PermissionError:
        code, problem = STATUS_UNKNOWN, (f"cannot read {path}: permission denied; run `sudo dcmon status`, or "
                                         f"join the dcmon group (sudo usermod -aG dcmon $USER, then log in again)")
    except (OSError, ValueError) as e:
        code, problem = STATUS_UNKNOWN, f"cannot read the status {path}: {getattr(e, 'strerror', None) or e}"
    if problem:
        if args.json:
            say(json.dumps({"health": {"status": _VERDICT[code], "exit": code, "problems": [problem]}}))
        else:
            say(f"DCMON {_VERDICT[code]}: {problem}")
        return code
    code, problems = assess(data, max_age_s=args.max_age, max_backlog_s=args.max_backlog)
    if args.json:
        say(json.dumps({**data, "health": {"status": _VERDICT[code], "exit": code, "problems": problems}}, indent=2))
        return code
    say(_status_verdict(code, problems, data))
    if args.brief:
        return code
    age = time.time() - float(data.get("time") or 0)
    say(f"poller pid {data.get('pid')}, {data.get('state', 'running')}, status {age:.0f} s old"
          + (f", dcmon {data['version']}" if data.get("version") else ""))
    for name, b in data.get("buses", {}).items():
        say(f"bus {name}: {b['port']}{'  ERROR: ' + b['error'] if b.get('error') else ''}")
    for name, s in data.get("sensors", {}).items():
        v = s.get("values") or {}
        state = {True: "up", False: "DOWN", None: "not polled"}[s.get("up")]
        when = f"{(time.time_ns() - s['last_time_ns']) / 1e9:.0f} s ago" if s.get("last_time_ns") else "never"
        vals = f"{v.get('voltage_v', 0):.2f} V {v.get('current_a', 0):.2f} A {v.get('power_w', 0):.1f} W" if v else ""
        backoff = f"  (backed off: next try in {s.get('retry_in_s', 0):.0f} s)" if s.get("backoff_s") else ""
        say(f"  {name:<12} {state:<10} ok {s['polls_ok']} failed {s['polls_failed']}  last {when}  {vals}"
              f"{'  ' + s['last_error'] if s.get('last_error') else ''}{backoff}")
    sp = data.get("spool", {})
    if sp:
        say(f"spool: {sp.get('depth', 0)} queued, {sp.get('dropped_total', 0)} dropped, {sp.get('quarantined', 0)} quarantined"
              f"{'  last error: ' + data['sender_error'] if data.get('sender_error') else ''}")
    for name, o in (data.get("outputs") or {}).items():
        if isinstance(o, dict):
            say(f"output {name}: {_output_state(o)}")
    if data.get("batteries"):
        from .battery_service import status_lines

        for line in status_lines(data["batteries"]):
            say(line)
    return code


def _output_state(o: dict) -> str:
    """One output's state and backlog, for `dcmon status`: "connected, 0 queued (spool-mqtt.sqlite)"."""
    parts = []
    if "connected" in o:
        parts.append("connected" if o["connected"] else "NOT CONNECTED")
    if o.get("url") and "connected" not in o:
        parts.append(str(o["url"]))
    if "depth" in o:
        parts.append(f"{o.get('depth', 0)} queued, {int(o.get('dropped_total') or 0) + int(o.get('lost_total') or 0)} "
                     f"dropped, {o.get('sent_points', 0)} sent" + (f" ({Path(str(o['spool'])).name})" if o.get("spool") else ""))
    if o.get("sending") is False:
        parts.append("not sending (disabled)")
    if o.get("last_error"):
        parts.append(f"last error: {o['last_error']}")
    return ", ".join(parts) or "running"


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return v


def _parser(sub: argparse._SubParsersAction, name: str, common: argparse.ArgumentParser, *, help: str,
            description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help, description=description,
                          epilog="examples:\n" + examples, formatter_class=Formatter)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p = _parser(sub, "run", common, help="poll the meters and write to InfluxDB (the main job)",
                description="Poll every configured meter on its bus, keep each reading in the local spool and send "
                            "the spool to InfluxDB, until stopped (Ctrl-C or systemctl stop). This is what the "
                            "service runs.",
                examples="  dcmon run --simulate              # simulated meters, no hardware needed\n"
                         "  dcmon run --once                  # one cycle: poll, print, send, exit (1 if a meter failed)\n"
                         "  dcmon run --test                  # poll once, print the line protocol, write nothing")
    p.add_argument("--simulate", action="store_true", help="poll simulated meters on a pseudo-terminal instead of the ports")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true",
                      help="one cycle: poll, print, send, exit; exit status 1 if a meter failed, a reading was "
                           "discarded or InfluxDB refused a line")
    once.add_argument("--test", action="store_true",
                      help="poll once and print the line protocol that would be written; touch neither the spool "
                           "nor the database (exit status as --once)")
    p.add_argument("--interval", type=float, default=None, metavar="S", help="seconds between polls (overrides poller.interval_s)")
    p.add_argument("--print", dest="print", action="store_true", default=None, help="print each reading (default on a terminal and with --once)")
    p.add_argument("--no-print", dest="print", action="store_false", help="do not print readings")
    p.set_defaults(func=cmd_run)

    p = _parser(sub, "check-config", common, help="validate the configuration and exit",
                description="Check the configuration whole (config.toml, config.local.toml beside it, DCMON_* "
                            "environment variables: every key, file and the spool's folder) without touching a "
                            "meter or the network, and name the files merged. A mistake gives one line naming the "
                            "file, the key and the fix, and exit status 2.",
                examples="  dcmon check-config\n  sudo -u dcmon dcmon check-config --config /etc/dcmon/config.toml")
    p.set_defaults(func=cmd_check_config)

    p = _parser(sub, "simulate", common, help="serve simulated PZEM meters on a pseudo-terminal",
                description="Serve simulated meters, speaking real Modbus RTU, on a pseudo-terminal that any command "
                            "can open as its serial port, until Ctrl-C. Without --model or --address it serves the "
                            "meters of the configuration (one pseudo-terminal per bus), or one PZEM-017 at address 1. "
                            "It prints the port and a command to try.",
                examples="  dcmon simulate\n"
                         "  dcmon simulate --steady --link /tmp/pzem     # values that do not wander, at /tmp/pzem\n"
                         "  dcmon simulate --address 1 --address 2 --shunt-code 100")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="meter model (default pzem017)")
    p.add_argument("--address", type=int, action="append", help="address to serve (repeat for more meters)")
    p.add_argument("--steady", action="store_true",
                   help="values that do not wander (13.20 V, 8.00 A for the first meter), e.g. to reproduce "
                        "the examples of docs/commissioning.md")
    p.add_argument("--shunt-code", type=int, choices=(50, 100, 200, 300), metavar="A",
                   help="the shunt code the PZEM-017 meters have (default: the config's shunt_a, like a commissioned "
                        "meter; 100 A, the factory code, without one)")
    p.add_argument("--timing", action="store_true", help="delay replies by the 9600-baud wire time")
    p.add_argument("--turnaround", type=float, default=0.0, metavar="S", help="extra reply delay in seconds (with --timing)")
    p.add_argument("--link", default=None, metavar="PATH", help="also make this symlink to the pseudo-terminal (e.g. /tmp/pzem)")
    p.set_defaults(func=cmd_simulate, address=None)

    p = _parser(sub, "status", common, help="is the poller running and healthy? (a health check for scripts)",
                description="What the running poller sees: each meter, its last reading and errors, the spool. The "
                            "first line is the verdict, and the exit status says it for scripts and monitoring "
                            "(Nagios plugin codes): 0 OK: running, every sensor up, no old backlog; 1 WARNING: "
                            "running, but a sensor is down, readings older than --max-backlog wait for InfluxDB, or a "
                            "battery is at or below its discharge floor; "
                            "2 CRITICAL: not running (stopped, killed, no status) or its status is older than "
                            "--max-age; 3 UNKNOWN: the status cannot be read (permissions).",
                examples="  dcmon status\n  dcmon status --brief || echo 'dcmon needs attention'\n"
                         "  dcmon status --json --max-backlog 300")
    p.add_argument("--json", action="store_true", help="print the status as JSON (with a \"health\" verdict)")
    p.add_argument("--brief", action="store_true", help="print only the verdict line")
    p.add_argument("--max-age", type=_seconds, default=STATUS_MAX_AGE_S, metavar="S",
                   help=f"a status older than this means the poller is hung (default {STATUS_MAX_AGE_S:g})")
    p.add_argument("--max-backlog", type=_seconds, default=STATUS_MAX_BACKLOG_S, metavar="S",
                   help=f"warn when the oldest unsent reading is older than this (default {STATUS_MAX_BACKLOG_S:g})")
    p.set_defaults(func=cmd_status)
