"""Outputs: where readings go after the poller (InfluxDB, MQTT, HTTP, ...), one module per output.

- ``dcmon.outputs.mqtt``: MQTT with Home Assistant discovery (newest state per meter, availability, and an
  opt-in durable stream of every reading).
- ``dcmon.outputs.http``: a local HTTP endpoint (Prometheus /metrics, /status, /healthz and a live page).
"""
