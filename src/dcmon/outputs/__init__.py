"""Outputs: where readings go after the spool (InfluxDB, MQTT, ...), one module per output.

- ``dcmon.outputs.mqtt``: MQTT with Home Assistant discovery (newest state per meter, availability, and an
  opt-in durable stream of every reading).
"""
