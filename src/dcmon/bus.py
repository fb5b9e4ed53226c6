"""One serial port with Modbus RTU meters on it: transport, framing and timing, and nothing about PZEM.

pymodbus does the framing (CRC-16/MODBUS, RTU frame detection, the 3.5-character silences) and the
pyserial transport. This module adds what a monitoring stack needs on top:

- one request at a time per port (a lock), and a configurable gap between transactions;
- errors that say which bus, which address and what happened, in words a person can act on:
  the port is missing / busy / not permitted (``BusError``), nothing came back (``NoResponse``),
  something came back but it was garbled (``BusError``: bad CRC, foreign or short frame), or the
  meter answered with a Modbus exception (``DeviceError``: "the meter said no");
- the port is opened exclusively (flock), so the bench tools cannot fight the running service for it;
- the vendor function 0x42 (reset energy), which pymodbus does not know, as a registered custom PDU.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import serial
from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from .errors import BusError, DeviceError, NoResponse, PortNotFound

log = logging.getLogger(__name__)

# pymodbus logs its own view of every timeout at ERROR; we report each failure once, ourselves.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

BROADCAST = 0x00
GENERAL_ADDRESS = 0xF8  # any single PZEM answers it: only safe with one meter on the bus


class ResetEnergyRequest(ModbusPDU):
    """PZEM vendor function 0x42: reset the energy counter. Request ``addr 42 CRC``, reply the same."""

    function_code = 0x42
    rtu_frame_size = 4

    def encode(self) -> bytes:
        return b""

    def decode(self, data: bytes) -> None:
        return None


class _RtuClient(ModbusSerialClient):
    """pymodbus's serial client, receiving a reply by its length rather than by polling.

    The stock ``recv(None)`` polls ``in_waiting`` every 4 character times until a poll sees no new byte, so
    each reply costs 5–9 ms after its last byte at 9600 baud (and ~14 wake-ups): 15 % of the wire's
    throughput and most of the poller's CPU (bench/bench_bus.py measured both). Here a blocking read takes
    the 3-byte head (address, function, byte count), pymodbus's own PDU table gives the frame length
    (exception replies included), and a second blocking read takes the rest; pyserial returns as soon as
    the last byte is in, or at the port timeout. Anything odd falls back to pymodbus's framer, which
    hunts for a valid frame as before."""

    def recv(self, size: int | None) -> bytes:
        if size is not None or self.socket is None:
            return super().recv(size)
        head = self.socket.read(3)
        if len(head) < 3:
            return head  # nothing (timeout) or a fragment: the framer decides
        try:
            pdu_class = self.framer.decoder.lookupPduClass(head)
            need = pdu_class.calculateRtuFrameSize(head) if pdu_class else 0
        except ModbusException:
            need = 0
        rest = self.socket.read(need - 3) if need > 3 else b""
        self.last_frame_end = round(time.time(), 6)
        return head + rest


@dataclass(frozen=True, slots=True)
class BusSettings:
    name: str
    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 2
    timeout_s: float = 0.5
    retries: int = 1
    gap_s: float = 0.02

    @property
    def char_time_s(self) -> float:
        """Seconds for one character on the wire: start bit + data bits + parity + stop bits."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    @property
    def framing(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


def check_port(port: str, bus: str = "") -> None:
    """Say precisely why a port cannot be opened, before pymodbus (which only logs) tries."""
    if port.startswith(("socket://", "rfc2217://", "loop://")):
        return
    where = f"bus {bus!r}: " if bus else ""
    if not os.path.exists(port):
        raise PortNotFound(f"{where}serial port {port} not found (is the adapter plugged in? ls -l /dev/serial/by-id/)", bus=bus)
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except PermissionError:
        raise BusError(f"{where}no permission to open {port} (add the user to the dialout group: "
                       f"sudo usermod -aG dialout $USER, then log in again)", bus=bus) from None
    except OSError as e:
        raise BusError(f"{where}cannot open {port}: {e.strerror}", bus=bus) from None
    try:
        import fcntl
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BusError(f"{where}{port} is in use by another program (the dcmon service? "
                               f"stop it first: sudo systemctl stop dcmon)", bus=bus) from None
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Bus:
    """A Modbus RTU master on one serial port. Thread-safe: one transaction at a time."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self._lock = threading.Lock()
        self._rx: bytearray = bytearray()
        self._last_end = 0.0
        self._client = _RtuClient(
            port=settings.port,
            framer=FramerType.RTU,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            timeout=settings.timeout_s,
            retries=settings.retries,
            trace_packet=self._trace_packet,
        )
        self._client.register(ResetEnergyRequest)

    # -------------------------------------------------------------------------------- life cycle
    def open(self) -> None:
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._client.connected:
            return
        check_port(self.settings.port, self.name)
        if not self._client.connect():
            raise BusError(f"bus {self.name!r}: cannot open {self.settings.port}", bus=self.name)

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def __enter__(self) -> Bus:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- transactions
    def read_input_registers(self, address: int, start: int, count: int) -> list[int]:
        rr = self._call(address, f"read {count} input registers at 0x{start:04X}",
                        lambda: self._client.read_input_registers(start, count=count, device_id=address))
        return self._registers(rr, address, count)

    def read_holding_registers(self, address: int, start: int, count: int) -> list[int]:
        rr = self._call(address, f"read {count} holding registers at 0x{start:04X}",
                        lambda: self._client.read_holding_registers(start, count=count, device_id=address))
        return self._registers(rr, address, count)

    def write_register(self, address: int, register: int, value: int) -> None:
        """Function 0x06. The meter's reply echoes the request; a different echo is a DeviceError."""
        rr = self._call(address, f"write 0x{value:04X} to holding register 0x{register:04X}",
                        lambda: self._client.write_register(register, value, device_id=address))
        echoed = getattr(rr, "registers", [value])
        if getattr(rr, "address", register) != register or (echoed and echoed[0] != value):
            raise DeviceError(f"bus {self.name!r} address {address}: write of register 0x{register:04X} was not echoed",
                              bus=self.name, address=address)

    def reset_energy(self, address: int) -> None:
        self._call(address, "reset energy (0x42)",
                   lambda: self._client.execute(False, ResetEnergyRequest(dev_id=address)))

    # ------------------------------------------------------------------------------- internals
    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx[:] = data
        return data

    def _call(self, address: int, what: str, fn: Any) -> Any:
        who = f"bus {self.name!r} address {address}"
        with self._lock:
            self._open_locked()
            wait = self._last_end + self.settings.gap_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._rx.clear()
            try:
                rr = fn()
            except ModbusException as e:
                raise self._io_error(who, what, address, e) from None
            except (serial.SerialException, OSError) as e:
                self._client.close()
                raise BusError(f"{who}: {what}: serial port failed: {e}", bus=self.name, address=address) from None
            finally:
                self._last_end = time.monotonic()
        if isinstance(rr, ExceptionResponse) or (hasattr(rr, "isError") and rr.isError()):
            code = getattr(rr, "exception_code", None)
            name = DeviceError.EXCEPTION_NAMES.get(code or 0, "error")
            raise DeviceError(f"{who}: {what}: the meter answered with exception {code:02d} ({name})" if code else
                              f"{who}: {what}: the meter refused", code=code, bus=self.name, address=address)
        return rr

    def _io_error(self, who: str, what: str, address: int, e: Exception) -> BusError:
        if self._rx:
            return BusError(f"{who}: {what}: garbled reply (bad CRC, short or foreign frame: "
                            f"{bytes(self._rx[:32]).hex(' ')}); check termination, wiring and that only one "
                            f"master is on the bus", bus=self.name, address=address)
        return NoResponse(f"{who}: {what}: no answer within {self.settings.timeout_s:g} s × "
                          f"{self.settings.retries + 1} tries (check A/B wiring, the meter's 5 V supply, "
                          f"{self.settings.framing} framing, and the address)", bus=self.name, address=address)

    def _registers(self, rr: Any, address: int, count: int) -> list[int]:
        regs = list(getattr(rr, "registers", []) or [])
        if len(regs) < count:
            raise BusError(f"bus {self.name!r} address {address}: short reply ({len(regs)} of {count} registers)",
                           bus=self.name, address=address)
        return regs[:count]
