"""The service: what `dcmon run` keeps running around the polling core (dcmon.poller).

It opens the spool and starts the sender that drains it to InfluxDB, the poll threads (``poller.bus_loop``),
the simulators of ``--simulate``, the signal handlers and the systemd watchdog, and publishes the status file
that `dcmon status` reads. ``run`` is the whole job; ``--once`` and ``--test`` are one cycle of it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .clock import Clock
from .config import Config, SensorConfig
from .errors import DcmonError, SinkError
from .poller import Poller, bus_loop
from .reading import Reading
from .systemd import Watchdog

if TYPE_CHECKING:
    from .sender import Sender
    from .spool import Spool, SpoolStats

log = logging.getLogger("dcmon.service")


SERVICE_STATUS = Path("/run/dcmon/status.json")  # the installed service's RuntimeDirectory (0750 dcmon:dcmon)


def _probe(path: Path) -> bool | None:
    """Whether ``path`` exists; None when a folder on the way is closed to this user (EACCES), so it cannot
    be told (``Path.exists()`` raises PermissionError there)."""
    try:
        path.stat()
    except PermissionError:
        return None
    except OSError:
        return False
    return True


def service_status_path() -> Path | None:
    """The status file named by the environment or the installed service, if any (no config needed)."""
    if os.environ.get("DCMON_STATUS_PATH"):
        return Path(os.environ["DCMON_STATUS_PATH"])
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "status.json"
    if _probe(SERVICE_STATUS) is not False:  # there, or there but closed to this user: that is the one
        return SERVICE_STATUS
    return None


def status_path(cfg: Config) -> Path:
    """Where the running poller publishes its status for `dcmon status`: $DCMON_STATUS_PATH, else the
    systemd runtime directory (tmpfs: no SD-card writes), else beside the spool."""
    return service_status_path() or cfg.resolve(cfg.spool.path).with_name("status.json")


def simulated_meters(sensors: list[SensorConfig], *, steady: bool = False, shunt_code: int | None = None) -> list:
    """SimMeters for configured sensors: each has its shunt wired (``shunt_a``) and, like a commissioned meter,
    the matching shunt code, unless ``shunt_code`` says which code it has instead (an uncommissioned meter)."""
    from .simulator import meters_for

    meters = meters_for([(s.model, s.address) for s in sensors], steady=steady)
    for m, s in zip(meters, sensors):
        if m.model.shunt_codes:
            if s.shunt_a:
                m.true_shunt_a = s.shunt_a
            amps = shunt_code or s.shunt_a
            if amps:
                m.holding[0x0003] = m.model.shunt_codes[amps]
    return meters


def start_simulators(cfg: Config) -> list:
    """--simulate: serve each bus's configured meters on a pty and point the bus at it."""
    from .simulator import Simulator

    sims = []
    for name in list(cfg.buses):
        sensors = cfg.enabled_sensors(name)
        if not sensors:
            continue
        sim = Simulator(simulated_meters(sensors)).start()
        sims.append(sim)
        cfg.buses[name].port = sim.path
        log.info("bus %r: simulating %d meter(s) on %s", name, len(sensors), sim.path)
    return sims


def format_reading(r: Reading) -> str:
    f = r.fields
    text = f"{r.sensor:<12} {float(f['voltage_v']):8.2f} V {float(f['current_a']):8.3f} A {float(f['power_w']):9.1f} W {float(f['energy_wh']):10.0f} Wh"
    alarms = [k for k, v in f.items() if k.endswith("_alarm") and v is True]
    if "frequency_hz" in f:
        text += f" {float(f['frequency_hz']):5.1f} Hz PF {float(f['power_factor']):.2f}"
    if alarms:
        text += "  ALARM: " + ", ".join(alarms)
    return text


def run(cfg: Config, *, simulate: bool = False, once: bool = False, echo: bool | None = None,
        stop: threading.Event | None = None, hint_simulate: bool = False, test: bool = False,
        clock: Clock | None = None) -> int:
    """The main job. Returns the exit status. ``echo``: print each reading (default: with ``once`` only)."""
    from .influx import InfluxSink
    from .sender import Sender
    from .spool import Spool

    cfg.require_sensors()   # the last checks before any I/O: something to poll, a spool we can write
    if test:
        return run_test(cfg, simulate=simulate, hint_simulate=hint_simulate)
    cfg.check_spool()
    for line in cfg.describe():
        log.info("%s", line)
    stop = stop or threading.Event()
    sims = start_simulators(cfg) if simulate else []
    clock = clock or Clock()  # one clock for stamps and the spool (held readings, the age cap)
    spool = Spool.open(cfg.resolve(cfg.spool.path), max_bytes=cfg.spool.max_bytes,
                       max_age_s=cfg.spool.max_age_days * 86400, durability=cfg.spool.durability, clock=clock)
    from .influx_setup import Backfill  # downsamples what a backlog delivered (a no-op before influx-setup)
    backfill = Backfill(cfg)
    sink = backfill.watch(InfluxSink(cfg.influxdb)) if cfg.influxdb.enabled else None
    sender = Sender(spool, sink, batch_lines=cfg.spool.batch_lines, on_backlog_sent=backfill if sink else None)

    def put(lines: list[str]) -> None:
        spool.put(lines)
        sender.poke()

    def show(r: Reading) -> None:
        print(format_reading(r), flush=True)

    watchdog = Watchdog.from_env(loops=["send"])
    poller = Poller(cfg, put=put, on_reading=show if (once if echo is None else echo) else None, retrying=not once,
                    hint_simulate=hint_simulate, progress=watchdog.progress, clock=clock)
    poller.restore_counters(_load_counters(spool))
    for name in poller.buses:
        watchdog.register(f"poll:{name}")
    if not poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    if not sink and once:  # the sender's thread says it when the poller runs on
        log.warning("influxdb.enabled = false: readings are kept in the spool %s only", cfg.resolve(cfg.spool.path))
    try:
        if once:
            return _run_once(cfg, poller, sender, spool)
        return _run_forever(cfg, poller, sender, spool, stop, watchdog)
    finally:
        _save_counters(spool, poller)
        poller.close()
        sender.close()
        spool.close()
        if sink:
            sink.close()
        for s in sims:
            s.stop()


def _load_counters(spool: Spool) -> dict[str, float]:
    try:
        return spool.load_counters()
    except DcmonError as e:  # never a reason not to poll: only a reset while stopped would go unflagged
        log.warning("cannot read the last energy counters from the spool (%s): a reset made while the poller "
                    "was stopped will not be flagged", e)
        return {}


def _save_counters(spool: Spool, poller: Poller) -> None:
    try:
        spool.save_counters(poller.counters())
    except DcmonError as e:
        log.warning("cannot keep the energy counters in the spool (%s)", e)


def _poll_all_once(poller: Poller) -> None:
    """One cycle of every bus, buses in parallel (each meter on a bus in turn)."""
    threads = [threading.Thread(target=poller.poll_bus_once, args=(name,), name=f"poll {name}") for name in poller.buses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _cycle_status(poller: Poller) -> int:
    """--once and --test: 1 when a meter failed or a reading was discarded (each was logged once already, with
    its cause: no summary line that says it again)."""
    failed = [st.name for st in poller.states.values() if not st.up]
    discarded = sum(st.discarded for st in poller.states.values())
    return 1 if failed or discarded or not poller.states else 0


def run_test(cfg: Config, *, simulate: bool = False, hint_simulate: bool = False) -> int:
    """``run --test`` (as ``telegraf --test``): poll every meter once and print the line protocol that would be
    written, one line per reading, on stdout. Neither the spool nor the database is touched."""
    sims = start_simulators(cfg) if simulate else []
    lines: list[str] = []
    lock = threading.Lock()

    def put(batch: list[str]) -> None:
        with lock:
            lines.extend(batch)

    poller = Poller(cfg, put=put, retrying=False, hint_simulate=hint_simulate)
    if not poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    try:
        _poll_all_once(poller)
    finally:
        poller.close()
        for sim in sims:
            sim.stop()
    for line in lines:
        print(line)
    sys.stdout.flush()
    target = (f"{cfg.influxdb.url} ({'bucket ' + cfg.influxdb.bucket if cfg.influxdb.api == 2 else 'database ' + cfg.influxdb.database})"
              if cfg.influxdb.enabled else "nowhere (influxdb.enabled = false)")
    log.info("--test: %d line(s) that would go to %s; nothing was spooled or written", len(lines), target)
    return _cycle_status(poller)


def _run_once(cfg: Config, poller: Poller, sender: Sender, spool: Spool) -> int:
    _poll_all_once(poller)
    quarantined_before = spool.stats().quarantined
    if cfg.influxdb.enabled:
        # send while it works (a backlog too, for up to 30 s); the first failure ends it with one line
        deadline = time.monotonic() + 30.0
        try:
            while sender.send_once() and time.monotonic() < deadline:
                pass
        except SinkError as e:
            log.warning("%s; %d reading(s) kept in the spool %s", e, spool.stats().depth, spool.path)
        else:
            stats = spool.stats()
            refused = stats.quarantined - quarantined_before
            if refused > 0:
                log.warning("InfluxDB refused %d line(s) for good: set aside in the quarantine (`dcmon spool "
                            "quarantine list` shows why)", refused)
                return 1
            if stats.depth:
                log.info("%d reading(s) still queued in the spool %s", stats.depth, spool.path)
            elif any(st.up for st in poller.states.values()):
                log.info("all readings written to %s", cfg.influxdb.url)
    return _cycle_status(poller)


def _run_forever(cfg: Config, poller: Poller, sender: Sender, spool: Spool, stop: threading.Event,
                 watchdog: Watchdog) -> int:

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the current cycle and flushing", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=bus_loop, args=(poller, name, stop, watchdog.progress), name=f"poll {name}", daemon=True)
               for name in poller.buses]

    def send_loop() -> None:
        sender.run(stop)

    sender_thread = threading.Thread(target=send_loop, name="sender", daemon=True)
    for t in threads:
        t.start()
    sender_thread.start()
    log.info("polling %d sensor(s) on %d bus(es) every %g s", len(poller.states), len(poller.buses), cfg.poller.interval_s)
    watchdog.ready(f"polling {len(poller.states)} sensor(s) on {len(poller.buses)} bus(es)")
    spath = status_path(cfg)
    last_send_check = next_status = time.monotonic()
    next_counters = next_status + COUNTERS_SAVE_S
    next_health = time.monotonic() + min(10.0, cfg.poller.health_interval_s or 10.0)
    while not stop.wait(1.0):
        now = time.monotonic()
        stats = spool.stats()
        if now >= next_status:  # every 5 s: cheap, and on tmpfs under systemd (RuntimeDirectory)
            next_status = now + 5.0
            _write_status(spath, _status_record(cfg, poller, stats, sender, "running"))
        if now >= next_counters:
            next_counters = now + COUNTERS_SAVE_S
            _save_counters(spool, poller)
        if cfg.poller.health_interval_s and time.monotonic() >= next_health:
            next_health = time.monotonic() + cfg.poller.health_interval_s
            spool.put(poller.health_lines(stats, sender))
        if sender_thread.is_alive() and getattr(sender, "last_progress", now) >= last_send_check:
            watchdog.progress("send")
        last_send_check = now
        watchdog.maybe_ping()
    sender.poke()  # wake the sender now rather than at its next tick
    for t in threads:
        t.join(timeout=max(5.0, max((b.timeout_s * (b.retries + 1) for b in cfg.buses.values()), default=0) * 10))
    sender_thread.join(timeout=5.0)
    if cfg.influxdb.enabled and not sender.flush(timeout_s=5.0):
        log.info("%d reading(s) stay in the spool for the next start", spool.stats().depth)
    watchdog.stopping()
    _write_status(spath, _status_record(cfg, poller, spool.stats(), sender, "stopped"))
    log.info("stopped")
    return 0


# The energy counters are saved this often (and at every stop): a counter only grows, so after a kill the saved
# value is at most a minute behind and a reset made while stopped is still a drop below it.
COUNTERS_SAVE_S = 60.0


def _status_record(cfg: Config, poller: Poller, stats: SpoolStats, sender: Sender, state: str) -> dict[str, object]:
    from . import __version__

    return {**poller.status(), "state": state, "version": __version__, "interval_s": cfg.poller.interval_s,
            "influxdb_enabled": cfg.influxdb.enabled, "spool": _stats_dict(stats),
            "sender_error": getattr(sender, "last_error", "")}




def _stats_dict(stats: SpoolStats) -> dict[str, object]:
    return {k: getattr(stats, k) for k in ("depth", "bytes", "oldest_time_ns", "dropped_total", "lost_total",
                                           "quarantined", "last_error", "held")}


def _write_status(path: Path, data: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write status file %s: %s", path, e)

