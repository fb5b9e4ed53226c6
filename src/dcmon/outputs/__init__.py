"""Outputs: where readings go after the poller (InfluxDB, MQTT, HTTP, ...), one module per output.

- ``dcmon.outputs.base``: the seam (``Output``, ``Sink``, ``OutputContext``), what the service calls.
- ``dcmon.outputs.influx``: InfluxDB (durable: the spool at spool.path, drained by a Sender into InfluxSink).
- ``dcmon.outputs.mqtt``: MQTT with Home Assistant discovery (newest state per meter, availability, and an
  opt-in durable stream of every reading from a spool of its own).
- ``dcmon.outputs.http``: a local HTTP endpoint (Prometheus /metrics, /status, /healthz and a live page).

``OUTPUTS`` is the registry the service builds from: config table → module with
``from_config(cfg, ctx) -> Output | None``. A module is imported only when its table is enabled (paho and
prometheus_client are not part of a start-up that does not use them); InfluxDB is always built (its spool is
the service's, kept even with influxdb.enabled = false).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Output, OutputContext

OUTPUTS = {
    "influxdb": "dcmon.outputs.influx",
    "mqtt": "dcmon.outputs.mqtt",
    "http": "dcmon.outputs.http",
}
ALWAYS = ("influxdb",)


def build(cfg: Config, ctx: OutputContext) -> list[Output]:
    """Every enabled output, in the registry's order (not started)."""
    out = []
    for table, module in OUTPUTS.items():
        if table not in ALWAYS and not getattr(getattr(cfg, table), "enabled", False):
            continue
        made = importlib.import_module(module).from_config(cfg, ctx)
        if made is not None:
            out.append(made)
    return out
