"""One serial port with Modbus RTU meters on it: transport, framing and timing, and nothing about PZEM.

pymodbus does the framing (CRC-16/MODBUS, RTU frame detection, the 3.5-character silences) and the
pyserial transport. This module adds what a monitoring stack needs on top:

- one request at a time per port (a lock), and a configurable gap between transactions (retries too: the
  retries are counted here, not in pymodbus, so that a meter that is down can be probed with one try);
- a receive that finds the reply by its address, function, length and CRC inside whatever arrived (leading
  junk, a foreign or cut-short frame, the adapter's echo), at the cost of the bytes themselves (``_RtuClient``),
  with counters of what it skipped (``LineStats``);
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
import struct
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import serial
from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from .errors import BusError, DeviceError, NoResponse, PortNotFound

log = logging.getLogger(__name__)

# pymodbus logs its own view of every timeout at ERROR; we report each failure once, ourselves: the command
# line quiets it above debug (dcmon.cli.quiet_libraries), not this module at import.

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


@dataclass
class LineStats:
    """What the receive path saw for one address: counters for `dcmon status` and the health points.

    ``resyncs``: replies recognised after skipping bytes that were not them (leading junk, a foreign or cut-short
    frame, the adapter's echo of our request); ``skipped_bytes``: bytes that were neither a reply nor the echo
    (in those exchanges and in failed ones); ``echoes``: copies of our own request; ``crc_errors``: frames with
    our address, function and length whose CRC was wrong; ``bad_frames``: attempts that ended without a valid
    reply although bytes with our address had arrived (a garbled reply: retried, or the poll failed); bytes
    without our address are line noise and the attempt counts as no answer; ``retries``: attempts after the
    first."""

    replies: int = 0
    resyncs: int = 0
    skipped_bytes: int = 0
    echoes: int = 0
    crc_errors: int = 0
    bad_frames: int = 0
    retries: int = 0

    def add(self, other: LineStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Expect:
    """The reply one request asks for: who must answer, with which function, and how long it is."""

    address: int
    function: int
    length: int | None        # of the normal reply frame; None: ask pymodbus's PDU table for each candidate
    byte_count: int | None    # the byte-count field a read reply must carry


def expected_reply(request: ModbusPDU) -> _Expect:
    """The reply frame ``request`` asks for. Known here for what dcmon sends (reads 0x03/0x04: 5 + 2 × count,
    write 0x06: its echo, 8; reset 0x42: 4); anything else is sized by pymodbus's PDU table as it arrives."""
    fc = request.function_code
    if fc in (0x03, 0x04):
        count = int(getattr(request, "count", 0) or 0)
        return _Expect(request.dev_id, fc, 5 + 2 * count, 2 * count)
    if fc == 0x06:
        return _Expect(request.dev_id, fc, 8, None)
    if fc == ResetEnergyRequest.function_code:
        return _Expect(request.dev_id, fc, 4, None)
    return _Expect(request.dev_id, fc, None, None)


def _crc_ok(frame: bytes | bytearray) -> bool:
    return FramerRTU.compute_CRC(frame[:-2]) == (frame[-2] << 8 | frame[-1])  # type: ignore[arg-type]  # bytearray too


class _RtuClient(ModbusSerialClient):
    """pymodbus's serial client, receiving a reply by its expected length and resynchronising on its head.

    The stock ``recv(None)`` polls ``in_waiting`` every 4 character times until a poll sees no new byte, so each
    reply costs 5–9 ms after its last byte at 9600 baud (and ~14 wake-ups): 15 % of the wire's throughput and
    most of the poller's CPU (bench/bench_bus.py measures both). Here ``execute`` notes the reply the request
    asks for (address, function, length: ``expected_reply``), and ``recv`` returns exactly that frame:

    - one blocking read of the expected length; on a clean line that is the reply, CRC checked, done;
    - otherwise the bytes so far are scanned for every position where the reply (or the meter's exception reply,
      function | 0x80) could start: our address, our function, for reads the byte count; a complete candidate
      whose CRC is right is the reply. Bytes before it (junk from the transceiver turning around, a reply from
      another address, a reply cut short, the adapter's echo of our request) are skipped and counted;
    - if none is complete, it reads exactly the fewest bytes that could complete one (so it never waits for a
      byte that is not coming), and scans again, until the reply's deadline (``timeout``).

    Nothing that arrives is handed to pymodbus's length table unchecked (it raises IndexError on some heads,
    e.g. ``01 18 05``). At the deadline without a valid reply it returns b"" (pymodbus: timeout), and
    ``last_garbage`` keeps what did arrive for the error message. A write's reply is the same bytes as its
    request: once the line has been seen to echo (``echo_seen``), the first copy is taken as the echo; before
    that, an echo would be taken for the reply, which is why every write is read back (meter.write_setting)."""

    def __init__(self, port: str, *, reply_timeout_s: float, **kw: Any) -> None:
        super().__init__(port, **kw)
        self.reply_timeout_s = reply_timeout_s
        self.expect: _Expect | None = None
        self.stats: dict[int, LineStats] = {}
        self.fast_receives = 0        # receives that went through recv_frame (tests check it is every one)
        self.echo_seen = False
        self.last_garbage = b""       # what arrived in the last attempt that ended without a reply (no echo)
        self.last_heard = False       # ... and whether our address was in it (a garbled reply, not mere noise)
        self._sent = b""

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> ModbusPDU:
        self.expect = None if no_response_expected else expected_reply(request)
        self.last_garbage, self.last_heard = b"", False
        try:
            return super().execute(no_response_expected, request)
        finally:
            self.expect = None

    def send(self, request: bytes, addr: tuple | None = None) -> int:
        self._sent = bytes(request)
        return super().send(request, addr)

    def recv(self, size: int | None) -> bytes:
        if size is not None or self.socket is None or self.expect is None:
            return super().recv(size)
        return self.recv_frame(self.expect)

    def recv_frame(self, ex: _Expect) -> bytes:
        self.fast_receives += 1
        st = self.stats.setdefault(ex.address, LineStats())
        sock = self.socket
        assert sock is not None
        deadline = time.monotonic() + self.reply_timeout_s
        buf = bytearray()
        want = ex.length or 5
        saved_timeout: float | None = None
        bad: set[int] = set()             # candidate starts whose CRC was wrong (counted once)
        try:
            while True:
                asked = want
                chunk = sock.read(asked)
                buf += chunk
                start, end, want = self._scan(buf, ex, st, bad)
                if end:
                    self._count(buf, start, ex, st)
                    return bytes(buf[start:end])
                left = deadline - time.monotonic()
                if len(chunk) < asked or left <= 0:   # a short read: the port's timeout ran out
                    break
                if saved_timeout is None:
                    saved_timeout = sock.timeout
                sock.timeout = left
        finally:
            if saved_timeout is not None:
                sock.timeout = saved_timeout
        echo = self._echo_len(buf)
        if echo:
            st.echoes += 1                # our own request: not an answer, not noise
        rest = bytes(buf[echo:])
        if rest:
            st.skipped_bytes += len(rest)
            self.last_garbage = rest
            self.last_heard = ex.address in rest
            if self.last_heard:           # something that may have come from this meter: a garbled reply
                st.bad_frames += 1
            log.debug("address %d: no valid reply in %d byte(s): %s", ex.address, len(rest), rest[:64].hex(" "))
        return b""

    def _echo_len(self, buf: bytearray) -> int:
        """Length of the copy of our request at the start of ``buf`` (0: none)."""
        sent = self._sent
        n = len(sent)
        return n if n and buf[:n] == sent else 0

    def _scan(self, buf: bytearray, ex: _Expect, st: LineStats, bad: set[int]) -> tuple[int, int, int]:
        """(start, end, 0) of the reply in ``buf``, or (0, 0, fewest bytes still to read that could complete one)."""
        n = len(buf)
        first = 0
        if ex.length == len(self._sent) and self.echo_seen:
            first = self._echo_len(buf)   # a write on an echoing line: its first copy is the echo
        exc_fc = ex.function | 0x80
        shortest = min(5, ex.length or 5)
        need = shortest                   # a reply that starts after everything we have
        for i in range(first, n):
            if buf[i] != ex.address or i in bad:
                continue
            if i + 1 >= n:
                need = min(need, i + shortest - n)
                continue
            fc = buf[i + 1]
            if fc == exc_fc:
                length: int | None = 5
            elif fc != ex.function:
                continue
            elif ex.byte_count is not None and i + 2 < n and buf[i + 2] != ex.byte_count:
                continue
            else:
                length = ex.length or self._table_length(buf, i)
            if length is None:            # pymodbus's table needs more of the head
                need = min(need, 1)
                continue
            if i + length <= n:
                if _crc_ok(buf[i:i + length]):
                    return i, i + length, 0
                st.crc_errors += 1
                bad.add(i)
                continue
            need = min(need, i + length - n)
        return 0, 0, max(1, need)

    def _table_length(self, buf: bytearray, i: int) -> int | None:
        """A function dcmon does not send itself: the frame length from pymodbus's PDU table, None while the
        head is too short to tell. Guarded: the table indexes the head without checking its length."""
        head = bytes(buf[i:i + 8])
        try:
            pdu_class = self.framer.decoder.lookupPduClass(head)
            size = pdu_class.calculateRtuFrameSize(head) if pdu_class else 0
        except (IndexError, struct.error, ModbusException):
            return None if len(head) < 8 else 5
        if not size or size > 256:
            return None if len(head) < 8 else 5
        return size

    def _count(self, buf: bytearray, start: int, ex: _Expect, st: LineStats) -> None:
        st.replies += 1
        echo = self._echo_len(buf) if start >= len(self._sent) else 0
        if ex.length != len(self._sent):  # a reply unlike the request tells whether this line echoes
            self.echo_seen = bool(echo)
        if echo:
            st.echoes += 1
        if start > echo:
            st.resyncs += 1
            st.skipped_bytes += start - echo
            log.debug("address %d: reply found after %d byte(s) that were not it: %s",
                      ex.address, start - echo, bytes(buf[echo:start][:64]).hex(" "))


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
        self._last_end = 0.0
        # Retries are ours (_call), not pymodbus's: a meter that is down is probed with one try, and a retry
        # waits the inter-frame gap like any other transaction.
        self._client = _RtuClient(
            port=settings.port,
            framer=FramerType.RTU,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            timeout=settings.timeout_s,
            retries=0,
            reply_timeout_s=settings.timeout_s,
        )
        self._client.register(ResetEnergyRequest)

    def line_stats(self, address: int | None = None) -> LineStats:
        """What the receive path saw: for one address, or summed over the bus. Without the bus lock (a status
        or health writer must not wait for a transaction): counters, read while they may be counting."""
        stats = dict(self._client.stats)
        if address is not None:
            return replace(stats.get(address, LineStats()))
        total = LineStats()
        for st in stats.values():
            total.add(st)
        return total

    @property
    def fast_receives(self) -> int:
        """Receives that went through dcmon's resynchronising receive (not pymodbus's stock one)."""
        return self._client.fast_receives

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
    def read_input_registers(self, address: int, start: int, count: int, *, tries: int | None = None) -> list[int]:
        """Function 0x04. ``tries``: attempts (default ``retries + 1``; the poller probes a meter that is down
        with one)."""
        rr = self._call(address, f"read {count} input registers at 0x{start:04X}",
                        lambda: self._client.read_input_registers(start, count=count, device_id=address), tries)
        return self._registers(rr, address, count)

    def read_holding_registers(self, address: int, start: int, count: int, *, tries: int | None = None) -> list[int]:
        rr = self._call(address, f"read {count} holding registers at 0x{start:04X}",
                        lambda: self._client.read_holding_registers(start, count=count, device_id=address), tries)
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
    def _call(self, address: int, what: str, fn: Any, tries: int | None = None) -> Any:
        who = f"bus {self.name!r} address {address}"
        tries = self.settings.retries + 1 if tries is None else max(1, tries)
        with self._lock:
            self._open_locked()
            for attempt in range(tries):
                wait = self._last_end + self.settings.gap_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                st = self._client.stats.setdefault(address, LineStats())
                if attempt:
                    st.retries += 1
                bad_before = st.bad_frames
                try:
                    rr = fn()
                    break
                except ModbusException as e:
                    error: BusError = self._io_error(who, what, address, e, tries)
                except (IndexError, ValueError, struct.error) as e:
                    # pymodbus choking on a frame that passed our checks: a bad frame like any other
                    log.debug("%s: %s: pymodbus could not decode the reply", who, what, exc_info=True)
                    st.bad_frames += 1
                    error = BusError(f"{who}: {what}: undecodable reply ({type(e).__name__}: {e}); check termination "
                                     f"and wiring", bus=self.name, address=address)
                except (serial.SerialException, OSError) as e:
                    self._client.close()
                    raise BusError(f"{who}: {what}: serial port failed: {e}", bus=self.name, address=address) from None
                finally:
                    self._last_end = time.monotonic()
                if st.bad_frames > bad_before and attempt + 1 < tries:
                    self._report_noise(who, address, st)
            else:
                raise error
        if isinstance(rr, ExceptionResponse) or (hasattr(rr, "isError") and rr.isError()):
            code = getattr(rr, "exception_code", None)
            name = DeviceError.EXCEPTION_NAMES.get(code or 0, "error")
            raise DeviceError(f"{who}: {what}: the meter answered with exception {code:02d} ({name})" if code else
                              f"{who}: {what}: the meter refused", code=code, bus=self.name, address=address)
        return rr

    def _report_noise(self, who: str, address: int, st: LineStats) -> None:
        """A garbled reply that a retry may still recover: at debug here (the poller summarises them)."""
        log.debug("%s: garbled reply (%s), retrying; %d bad frame(s) on this address so far",
                  who, self._client.last_garbage[:64].hex(" "), st.bad_frames)

    def _io_error(self, who: str, what: str, address: int, e: Exception, tries: int) -> BusError:
        got = self._client.last_garbage
        if got and self._client.last_heard:
            return BusError(f"{who}: {what}: garbled reply (bad CRC, short or foreign frame: "
                            f"{got[:32].hex(' ')}); check termination, wiring and that only one "
                            f"master is on the bus", bus=self.name, address=address)
        noise = f", only {len(got)} byte(s) of line noise: {got[:16].hex(' ')}" if got else ""
        return NoResponse(f"{who}: {what}: no answer within {self.settings.timeout_s:g} s × "
                          f"{tries} tr{'ies' if tries > 1 else 'y'}{noise} (check A/B wiring, the meter's 5 V supply, "
                          f"{self.settings.framing} framing, and the address)", bus=self.name, address=address)

    def _registers(self, rr: Any, address: int, count: int) -> list[int]:
        regs = list(getattr(rr, "registers", []) or [])
        if len(regs) < count:
            raise BusError(f"bus {self.name!r} address {address}: short reply ({len(regs)} of {count} registers)",
                           bus=self.name, address=address)
        return regs[:count]
