"""The seam between the service and its outputs (InfluxDB, MQTT, HTTP, and whatever comes next).

An output is an ``Output``: the service (dcmon.service) builds every enabled one from the config through the
registry in ``dcmon.outputs`` and then, for each of them,

- ``start()`` once, before the first poll;
- ``on_reading(reading)`` for every reading, on the bus thread that made it: it must not block or do I/O
  (keep it in memory and let a thread of the output's own do the rest), so no output can slow a bus;
- ``meter_state(sensor, up, labels)`` after every poll of a meter (``up`` False: it did not answer, or its
  bus is gone); ``labels``: host, bus, model;
- ``on_battery(state)`` after every cycle that read one of a battery's meters (``[[batteries]]``): the
  battery monitor's ``dcmon.battery.BatteryState`` (None values are unknown, never 0), on the bus thread:
  never block either;
- ``flush()`` (``dcmon run --once`` only, after its cycle): deliver what was handed over, waiting at most the
  output's own timeout; False when it could not (the output logs one line saying why);
- ``status()``: a small JSON-able dict for status.json (``dcmon status``, ``/status``), under
  ``"outputs"``;
- ``close()`` once, at the end.

A **durable** output (``durable = True``) additionally gets its own spool file (``spool_path``) holding every
reading line, and its own ``Sender`` thread draining that spool into ``sink()`` (the ``Sink`` contract below).
One spool per durable output: an outage of one never blocks, slows or loses the other's data, and caps and
drops are counted per output (bench/README.md has what the second spool costs). ``sink()`` may be None: the
spool is kept but not sent (``influxdb.enabled = false``).

Adding an output: a module under ``dcmon/outputs/`` with a subclass of ``Output`` and a function
``from_config(cfg, ctx) -> Output | None``, its name in ``dcmon.outputs.OUTPUTS``, and its config table in
``dcmon.config`` (docs/architecture.md, "Where to add an output").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from ..battery import BatteryState
    from ..config import Config
    from ..reading import Reading


class Sink(Protocol):
    """What a Sender drains a spool into. ``write`` delivers a batch of line-protocol lines or raises a
    ``dcmon.errors`` SinkError: SinkPermanent (bad lines: quarantined, with ``bad_lines`` when known),
    SinkTooLarge (split the batch), SinkAuth (keep everything, say what to fix), SinkRetryable (back off).
    ``where`` names the destination in log lines (never a secret). A sink may also have ``ping() -> bool``,
    a cheap probe the sender uses while it backs off from an unreachable server."""

    where: str

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class OutputContext:
    """What the service gives an output when it is built: ``status()`` is the dict of status.json (the same
    as ``dcmon status --json`` without its verdict), ``healthy()`` True while every loop of the service
    progressed recently (the watchdog's view)."""

    status: Callable[[], dict[str, Any]]
    healthy: Callable[[], bool]


class Output:
    """Base class of an output: every hook is a no-op here, so an output overrides only what it uses."""

    name: str = "output"            # the key under "outputs" in status.json, and in log lines
    durable: bool = False           # True: it gets a spool file of its own and a Sender draining it into sink()
    spool_path: Path | None = None  # the durable output's spool file
    on_backlog_sent: Callable[[float], None] | None = None  # passed to its Sender (called after an outage)

    def start(self) -> None:
        """Connect / listen in the background; must not wait for a server (an outage is logged, not raised)."""

    def on_reading(self, reading: Reading) -> None:
        """A new reading, on a bus thread: never block, never do I/O here."""

    def meter_state(self, sensor: str, up: bool, labels: Mapping[str, str]) -> None:
        """After every poll of a meter: does it answer? Never block."""

    def on_battery(self, state: BatteryState) -> None:
        """A battery monitor's new state (after a cycle that read its meters), on a bus thread: never block."""

    def flush(self) -> bool:
        """`run --once`: deliver what was handed over before the process exits (up to the output's timeout)."""
        return True

    def sink(self) -> Sink | None:
        """A durable output's destination (drained from its spool by a Sender); None: keep the spool only."""
        return None

    def status(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        """Stop (flush what is cheap to flush, disconnect). Called once, after the last reading."""


def beside(spool_path: Path, name: str) -> Path:
    """The spool file of a second durable output, next to the main one: var/spool.sqlite → var/spool-mqtt.sqlite."""
    return spool_path.with_name(f"{spool_path.stem}-{name}{spool_path.suffix}")


Factory = Callable[["Config", OutputContext], "Output | None"]
