"""Outputs: where readings go after the poller (InfluxDB, MQTT, HTTP, ...), one module per output."""
