"""The error tree. Every error a user can cause or meet has one line of text that names what failed
and, where we know it, what to do about it. Nothing below is ever shown as a traceback.

    DcmonError
    ├── ConfigError        file, key, problem, fix                       → exit status 2
    ├── UsageError         the command line does not say enough, or a value is out of range before any I/O
    │                      (bench commands: exit status 2)
    ├── BusError           the line failed: port busy/no permission, bad CRC, foreign frame
    │   ├── PortNotFound   the serial port does not exist
    │   ├── NoResponse     nothing (valid) came back before the timeout
    │   └── MultipleMeters more than one meter answers where exactly one must (the general address)
    ├── DeviceError        the meter answered, but with an exception code, or a write did not read back
    ├── CalibrationError   the reference points cannot give a sensible calibration
    ├── SpoolError         the spool file cannot be used at all
    ├── BatteryStoreError  the battery-state file cannot be used at all (folder not writable)
    ├── SinkError          the database refused or could not be reached
    │   ├── SinkPermanent  400: the lines are bad; retrying will not help (quarantine them)
    │   ├── SinkAuth       401/403/404: credentials, org, bucket or database wrong: keep data, alert
    │   ├── SinkTooLarge   413: split the batch
    │   └── SinkRetryable  429/5xx/connection errors: back off and retry
    ├── SetupError         influx-setup: InfluxDB could not be reached, or refused a statement
    └── GrafanaError       grafana-import: Grafana could not be reached, or refused a request
"""

from __future__ import annotations


class DcmonError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DcmonError):
    """The configuration is invalid. Always names the file and the key, and says how to fix it."""

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        text = f"{file}: {key}: {problem}" if key else f"{file}: {problem}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class UsageError(DcmonError):
    """The command line does not say enough (or says contradictory things), or a value is outside what the
    meter accepts, found before anything is sent: exit status 2 in the bench commands."""


class BusError(DcmonError):
    """The serial line failed: the port, the framing, the CRC. Says which bus (and meter)."""

    def __init__(self, message: str, *, bus: str = "", address: int | None = None) -> None:
        self.bus, self.address = bus, address
        super().__init__(message)


class PortNotFound(BusError):
    """The serial port does not exist (adapter unplugged, wrong name)."""


class NoResponse(BusError):
    """Nothing valid came back in time. Most often: A/B swapped, no 5 V on the meter's RS485 side,
    wrong stop bits, wrong address."""


class MultipleMeters(BusError):
    """More than one meter answers where exactly one must (the general address)."""


class DeviceError(DcmonError):
    """The meter answered, but said no (Modbus exception reply), or a written value did not read back."""

    EXCEPTION_NAMES = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "device failure",
    }

    def __init__(self, message: str, *, code: int | None = None, bus: str = "", address: int | None = None) -> None:
        self.code, self.bus, self.address = code, bus, address
        super().__init__(message)


class SinkError(DcmonError):
    """Writing to the database failed. Never carries the token or password in its text."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        self.status, self.retry_after = status, retry_after
        super().__init__(message)


class SinkPermanent(SinkError):
    """400 and friends: the server rejected the data itself. `bad_lines` are 0-based indexes into the batch
    when the server said which line was bad."""

    def __init__(self, message: str, *, status: int | None = None, bad_lines: list[int] | None = None) -> None:
        super().__init__(message, status=status)
        self.bad_lines = bad_lines or []


class SinkAuth(SinkError):
    """401/403/404: wrong token/password, or the org/bucket/database does not exist."""


class SinkTooLarge(SinkError):
    """413: the batch is too large for the server; split it."""


class SinkRetryable(SinkError):
    """429, 5xx, timeouts and connection errors: try again later (honour retry_after when set)."""


class CalibrationError(DcmonError):
    """The reference points cannot give a sensible calibration (says why and what to do)."""


class SpoolError(DcmonError):
    """The spool file cannot be used at all (directory not writable, not a spool file)."""


class BatteryStoreError(DcmonError):
    """The battery-state file cannot be used at all (folder not writable, cannot be moved aside)."""


class SetupError(DcmonError):
    """InfluxDB could not be reached, or refused a statement."""


class GrafanaError(DcmonError):
    """Grafana could not be reached, or refused a request."""
