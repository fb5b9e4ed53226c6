"""dcmon: PZEM power meters on RS485 (Modbus RTU) → durable local spool → InfluxDB → Grafana."""

__version__ = "0.1.0"
