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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from .clock import Clock
from .config import Config, SensorConfig
from .errors import DcmonError, SinkError
from .outputs.base import Output, OutputContext
from .poller import Poller, SensorState, bus_loop
from .reading import Reading
from .systemd import Watchdog

if TYPE_CHECKING:
    from .battery import BatteryState
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

    meters = meters_for([(s.meter, s.address) for s in sensors], steady=steady)
    for m, s in zip(meters, sensors):
        if m.model.shunt_codes:
            if s.shunt_a:
                m.true_shunt_a = s.shunt_a
            amps = shunt_code or s.shunt_a
            if amps:
                m.holding[0x0003] = m.model.shunt_codes[amps]
    return meters


def _demo_batteries(cfg: Config) -> dict:
    """--simulate with [[batteries]]: a battery model behind each battery's meters (dcmon.battery_sim), so
    that its state of charge becomes known a few minutes after the start and then cycles. A meter in two
    batteries follows the first."""
    if not cfg.batteries:
        return {}
    from .battery_sim import demo_drives

    drives: dict = {}
    start = time.monotonic()
    for b in cfg.batteries:
        if not b.can_count:
            continue
        for sensor, drive in demo_drives(b.capacity_ah, b.nominal_v, b.chemistry, b.charge, b.discharge,
                                         start).items():
            drives.setdefault(sensor, drive)
        log.info("battery %s: simulated (%g Ah, %s, 99.5 %% full, charger on 15 min of every hour): its state "
                 "of charge is known once it synchronises, a few minutes after the start", b.name,
                 b.capacity_ah, b.chemistry)
    return drives


def start_simulators(cfg: Config) -> list:
    """--simulate: serve each bus's configured meters on a pty and point the bus at it."""
    from .simulator import Simulator

    drives = _demo_batteries(cfg)
    sims = []
    for name in list(cfg.buses):
        sensors = cfg.enabled_sensors(name)
        if not sensors:
            continue
        meters = simulated_meters(sensors)
        for m, s in zip(meters, sensors):
            m.drive = drives.get(s.name, m.drive)
        sim = Simulator(meters).start()
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


# ---------------------------------------------------------------------------------------- the service

class ReadingConsumer(Protocol):
    """Something in the process that takes each bus cycle's readings and adds lines of its own to the same
    spool transaction (e.g. a battery monitor's state of charge), with a status of its own in status.json.
    Add one to ``Service.consumers`` (see there)."""

    name: str

    def on_readings(self, readings: Sequence[Reading]) -> list[str]: ...

    def status(self) -> dict[str, object]: ...

    def close(self) -> None: ...


@dataclass
class Lane:
    """A durable output's spool and the Sender draining it (one spool file and one sender thread per durable
    output: an outage of one output never blocks, slows or loses the other's data)."""

    output: Output
    spool: Spool
    sender: Sender
    loop: str                                    # its watchdog loop name ("send", "send:mqtt")
    thread: threading.Thread | None = None


class Heartbeat:
    """When each loop last made progress: feeds the systemd watchdog and ``/healthz`` (HTTP output)."""

    def __init__(self, watchdog: Watchdog, max_age_s: float) -> None:
        self.watchdog, self.max_age_s = watchdog, max_age_s
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()

    def register(self, name: str) -> None:
        self.watchdog.register(name)
        with self._lock:
            self._at.setdefault(name, time.monotonic())

    def progress(self, name: str) -> None:
        self.watchdog.progress(name)
        with self._lock:
            self._at[name] = time.monotonic()

    def healthy(self) -> bool:
        """Every loop progressed within ``max_age_s``."""
        now = time.monotonic()
        with self._lock:
            return all(now - t <= self.max_age_s for t in self._at.values())


class Service:
    """The job of `dcmon run`: the poller, the outputs (dcmon.outputs: one spool + Sender per durable output,
    the others fed in memory), the status file, the watchdog. ``run()`` = ``start`` + the loop + ``stop``."""

    def __init__(self, cfg: Config, *, once: bool = False, echo: bool = False, hint_simulate: bool = False,
                 clock: Clock | None = None, counters: bool = True) -> None:
        """``counters``: keep the meters' last energy counters in the spool across restarts (a reset made while
        stopped is flagged). Off for ``--simulate``: simulated meters start afresh each run and are not the
        real meters whose counters the spool keeps."""
        from . import outputs as outputs_mod
        from .sender import Sender
        from .spool import Spool

        self.cfg = cfg
        self.clock = clock or Clock()  # one clock for stamps and the spools (held readings, the age cap)
        self.watchdog = Watchdog.from_env()
        self.beat = Heartbeat(self.watchdog, max_age_s=max(30.0, 3 * cfg.poller.interval_s))
        self._echo = echo
        self._complaints: dict[tuple[str, str], str] = {}
        self._complaints_lock = threading.Lock()
        # Reading consumers: each cycle's readings in, extra lines (spooled with the cycle) out, a status dict
        # under its name in status.json, closed at the end. Add one here.
        self.consumers: list[ReadingConsumer] = []
        if cfg.batteries:
            from .battery_service import BatteryService   # only when [[batteries]] is configured

            battery = BatteryService.from_config(cfg, on_state=self._on_battery)
            if battery is not None:
                self.consumers.append(battery)
        self.outputs: list[Output] = []
        self.lanes: list[Lane] = []
        try:
            self.outputs = outputs_mod.build(cfg, OutputContext(status=lambda: self.status_record("running"),
                                                                healthy=self.beat.healthy))
            for out in self.outputs:
                if not out.durable or out.spool_path is None:
                    continue
                spool = Spool.open(out.spool_path, max_bytes=cfg.spool.max_bytes,
                                   max_age_s=cfg.spool.max_age_days * 86400, durability=cfg.spool.durability,
                                   clock=self.clock)
                sender = Sender(spool, out.sink(), batch_lines=cfg.spool.batch_lines,
                                on_backlog_sent=out.on_backlog_sent)
                self.lanes.append(Lane(out, spool, sender, "send" if not self.lanes else f"send:{out.name}"))
        except BaseException:
            self._close_outputs()
            raise
        self.main = self.lanes[0]   # InfluxDB's: spool.path (energy counters, health points, `dcmon spool`)
        self.spool = self.main.spool
        for lane in self.lanes:
            self.beat.register(lane.loop)
        self.poller = Poller(cfg, put=self._put, on_reading=self._on_reading, on_meter_state=self._on_meter_state,
                             extra_lines=self._extra_lines if self.consumers else None, retrying=not once,
                             hint_simulate=hint_simulate, progress=self.beat.progress, clock=self.clock)
        self.counters = counters
        if counters:
            self.poller.restore_counters(_load_counters(self.spool))
        for name in self.poller.buses:
            self.beat.register(f"poll:{name}")

    # ------------------------------------------------------------------- what the bus threads call
    def _put(self, lines: list[str]) -> None:
        """A bus cycle's lines: into every durable output's spool (one transaction each), then wake its sender."""
        for lane in self.lanes:
            try:
                lane.spool.put(lines)
            except Exception as e:   # noqa: BLE001 - one output's spool failing must not cost the others theirs
                if lane is self.main:
                    raise
                self._complain(lane.output.name, "spool", e)
            lane.sender.poke()

    def _extra_lines(self, readings: list[Reading]) -> list[str]:
        extra: list[str] = []
        for c in self.consumers:
            try:
                extra += c.on_readings(readings)
            except Exception as e:   # noqa: BLE001 - a consumer's bug must not stop the readings
                self._complain(c.name, "on_readings", e)
        return extra

    def _on_reading(self, r: Reading) -> None:
        if self._echo:
            print(format_reading(r), flush=True)
        self._each(self.outputs, "on_reading", r)

    def _on_battery(self, state: BatteryState) -> None:
        self._each(self.outputs, "on_battery", state)

    def _on_meter_state(self, st: SensorState, up: bool) -> None:
        labels = {"host": self.cfg.host, "bus": st.cfg.bus, "model": st.cfg.model}
        self._each(self.outputs, "meter_state", st.name, up, labels)

    def _each(self, peers: Sequence[Output] | Sequence[ReadingConsumer], call: str, *args: object) -> None:
        """``peer.<call>(*args)`` on every output (or consumer), each guarded: one's bug must stop neither the
        bus nor the others (logged once by _complain)."""
        for peer in peers:
            try:
                getattr(peer, call)(*args)
            except Exception as e:   # noqa: BLE001 - see the docstring
                self._complain(peer.name, call, e)

    def _complain(self, who: str, what: str, e: BaseException) -> None:
        """An output's unexpected error: one line per output, call and kind of error (debug has the traceback)."""
        text = f"{type(e).__name__}: {e}"
        log.debug("%s: %s failed", who, what, exc_info=True)
        with self._complaints_lock:
            if self._complaints.get((who, what)) == text:
                return
            self._complaints[(who, what)] = text
        log.error("output %s: %s failed (%s); polling and the other outputs go on", who, what, text)

    # ------------------------------------------------------------------------------------ status
    def status_record(self, state: str) -> dict[str, object]:
        """What status.json holds (and HTTP's /status): the poller's status, the InfluxDB spool under "spool"
        (as before outputs were peers), and every output under "outputs" with its own backlog."""
        from . import __version__

        stats = _stats_dict(self.spool.stats())
        outputs: dict[str, object] = {}
        for out in self.outputs:
            try:
                entry: dict[str, object] = dict(out.status())
            except Exception as e:   # noqa: BLE001 - a status must always be written
                entry = {"last_error": f"status failed: {type(e).__name__}"}
            lane = next((ln for ln in self.lanes if ln.output is out), None)
            if lane is not None:
                own_error = entry.get("last_error", "")
                entry.update(stats if lane is self.main else _stats_dict(lane.spool.stats()))
                entry.update({"spool": str(lane.spool.path), "sent_points": lane.sender.sent_points,
                              "send_failures": lane.sender.send_failures,
                              "last_error": lane.sender.last_error or own_error, "sending": out.sink() is not None})
            outputs[out.name] = entry
        record: dict[str, object] = {
            **self.poller.status(), "state": state, "version": __version__, "interval_s": self.cfg.poller.interval_s,
            "influxdb_enabled": self.cfg.influxdb.enabled, "spool": stats, "sender_error": self.main.sender.last_error,
            "outputs": outputs}
        for c in self.consumers:
            try:
                record[c.name] = c.status()
            except Exception as e:   # noqa: BLE001 - as above
                self._complain(c.name, "status", e)
        return record

    # --------------------------------------------------------------------------------- the job
    def start_outputs(self) -> None:
        for out in self.outputs:
            out.start()

    def run_once(self) -> int:
        cfg, spool, sender = self.cfg, self.spool, self.main.sender
        _poll_all_once(self.poller)
        quarantined_before = spool.stats().quarantined
        for lane in self.lanes[1:]:   # the other durable outputs: what this cycle spooled, for up to their timeout
            if lane.output.sink() is not None and not lane.sender.flush(timeout_s=10.0):
                log.warning("%s: %d reading(s) kept in the spool %s (%s)", lane.output.name, lane.spool.stats().depth,
                            lane.spool.path, lane.sender.last_error or "not sent in time")
        self._each(self.outputs, "flush")   # the live outputs (MQTT's states): delivered before the process exits
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
                elif any(st.up for st in self.poller.states.values()):
                    log.info("all readings written to %s", cfg.influxdb.url)
        return _cycle_status(self.poller)

    def run_forever(self, stop: threading.Event) -> int:
        cfg, poller, spool, watchdog = self.cfg, self.poller, self.spool, self.watchdog

        def on_signal(signum: int, _frame: object) -> None:
            log.info("%s received: finishing the current cycle and flushing", signal.Signals(signum).name)
            stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        threads = [threading.Thread(target=bus_loop, args=(poller, name, stop, self.beat.progress), name=f"poll {name}",
                                    daemon=True) for name in poller.buses]
        for lane in self.lanes:
            lane.thread = threading.Thread(target=lane.sender.run, args=(stop,), daemon=True,
                                           name="sender" if lane is self.main else f"sender {lane.output.name}")
        for t in threads:
            t.start()
        for lane in self.lanes:
            assert lane.thread is not None
            lane.thread.start()
        log.info("polling %d sensor(s) on %d bus(es) every %g s", len(poller.states), len(poller.buses), cfg.poller.interval_s)
        watchdog.ready(f"polling {len(poller.states)} sensor(s) on {len(poller.buses)} bus(es)")
        spath = status_path(cfg)
        last_send_check = next_status = time.monotonic()
        next_counters = next_status + COUNTERS_SAVE_S
        next_health = time.monotonic() + min(10.0, cfg.poller.health_interval_s or 10.0)
        while not stop.wait(1.0):
            now = time.monotonic()
            if now >= next_status:  # every 5 s: cheap, and on tmpfs under systemd (RuntimeDirectory)
                next_status = now + 5.0
                _write_status(spath, self.status_record("running"))
            if now >= next_counters and self.counters:
                next_counters = now + COUNTERS_SAVE_S
                _save_counters(spool, poller)
            if cfg.poller.health_interval_s and time.monotonic() >= next_health:
                next_health = time.monotonic() + cfg.poller.health_interval_s
                spool.put(poller.health_lines(spool.stats(), self.main.sender))
            for lane in self.lanes:
                if lane.thread is not None and lane.thread.is_alive() and lane.sender.last_progress >= last_send_check:
                    self.beat.progress(lane.loop)
            last_send_check = now
            watchdog.maybe_ping()
        for lane in self.lanes:
            lane.sender.poke()  # wake the senders now rather than at their next tick
        for t in threads:
            t.join(timeout=max(5.0, max((b.timeout_s * (b.retries + 1) for b in cfg.buses.values()), default=0) * 10))
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.join(timeout=5.0)
        for lane in self.lanes:
            if lane.output.sink() is not None and not lane.sender.flush(timeout_s=5.0):
                log.info("%d reading(s) stay in the spool %s for the next start", lane.spool.stats().depth,
                         lane.spool.path)
        watchdog.stopping()
        _write_status(spath, self.status_record("stopped"))
        log.info("stopped")
        return 0

    def close(self) -> None:
        if self.counters:
            _save_counters(self.spool, self.poller)
        self.poller.close()
        self._each(self.consumers, "close")   # closing the rest matters more than one's error
        self._close_outputs()

    def _close_outputs(self) -> None:
        for lane in self.lanes:
            lane.sender.close()
            lane.spool.close()
        self._each(self.outputs, "close")


def run(cfg: Config, *, simulate: bool = False, once: bool = False, echo: bool | None = None,
        stop: threading.Event | None = None, hint_simulate: bool = False, test: bool = False,
        clock: Clock | None = None) -> int:
    """The main job. Returns the exit status. ``echo``: print each reading (default: with ``once`` only)."""
    cfg.require_sensors()   # the last checks before any I/O: something to poll, a spool we can write
    if test:
        return run_test(cfg, simulate=simulate, hint_simulate=hint_simulate)
    cfg.check_spool()
    for line in cfg.describe():
        log.info("%s", line)
    stop = stop or threading.Event()
    sims = start_simulators(cfg) if simulate else []
    try:
        service = Service(cfg, once=once, echo=bool(once if echo is None else echo), hint_simulate=hint_simulate,
                          clock=clock, counters=not simulate)
    except BaseException:
        for s in sims:
            s.stop()
        raise
    if not service.poller.states:
        log.warning("no enabled sensors in %s: nothing to poll", cfg.source)
    if not cfg.influxdb.enabled and once:  # the sender's thread says it when the poller runs on
        log.warning("influxdb.enabled = false: readings are kept in the spool %s only", cfg.resolve(cfg.spool.path))
    try:
        service.start_outputs()
        if once:
            return service.run_once()
        return service.run_forever(stop)
    finally:
        service.close()
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


# The energy counters are saved this often (and at every stop): a counter only grows, so after a kill the saved
# value is at most a minute behind and a reset made while stopped is still a drop below it.
COUNTERS_SAVE_S = 60.0


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

