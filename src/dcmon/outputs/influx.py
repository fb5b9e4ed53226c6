"""The InfluxDB HTTP writer: line protocol in, an answer classified into the error tree out.

v1: ``POST /write?db=&rp=&precision=ns`` with basic auth when a username is set (InfluxDB 1.x; 2.x, 3.x and
Cloud accept it too). v2: ``POST /api/v2/write?org=&bucket=&precision=ns`` with ``Authorization: Token``.

Classification (what the sender does with each):
- 2xx                       → acknowledged
- 400 / 422                 → SinkPermanent: the server said which line is bad (1.x/2.x: "... line N ...")
- 401 / 403 / 404           → SinkAuth: credentials, org, bucket or database wrong; keep the data
- 413                       → SinkTooLarge: split the batch
- 429 / 5xx / network error → SinkRetryable, with Retry-After when the server sent it
The token and password never appear in a message: httpx errors are reduced to their class and the host,
and user-info in a URL (``http://user:pw@host``: the config refuses it, this is belt and braces) is
redacted by ``redact_url`` wherever a URL is printed or stored (``where``, the sender's errors).

One deadline for the whole request: httpx's ``timeout`` applies to each read and each write, so a server
that trickles a byte a second would hold a write forever. ``_Deadline`` watches every request: past
``timeout_s`` in all it shuts the request's socket down (found through httpx's public ``trace`` extension
when the connection is made), the blocked read returns at once, and the write fails as retryable: "no
complete answer within N s". ``ping()`` (``GET /ping``, which InfluxDB 1.x/2.x and VictoriaMetrics answer
without credentials) is the sender's cheap probe while it backs off.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import weakref
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone

from typing import TYPE_CHECKING

import httpx

from ..config import InfluxConfig
from ..errors import SinkAuth, SinkError, SinkPermanent, SinkRetryable, SinkTooLarge
from .base import Output, OutputContext, Sink

if TYPE_CHECKING:
    from ..config import Config

_LINE_RE = re.compile(r"line (\d+)")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")
PING_TIMEOUT_S = 2.0


def redact_url(text: str) -> str:
    """``http://user:secret@host`` → ``http://***@host`` in a URL or any text holding URLs."""
    return _USERINFO.sub(r"\1***@", text)


class _Deadline:
    """Bounds a whole request: one watcher thread (started on first use, idle between requests) shuts down
    the sockets of the sink's connections when an armed deadline passes. Only one request is in flight
    per sink (the sender serialises them), so shutting down all of them is shutting down that one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._socks: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._at: float | None = None
        self._thread: threading.Thread | None = None
        self.fired = False

    def trace(self, event: str, info: dict) -> None:
        """httpx trace extension: remember the socket of each new connection."""
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with self._cond:
                    self._socks.add(sock)

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._at, self.fired = time.monotonic() + seconds, False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="influx-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._at = None

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    while self._at is None:
                        self._cond.wait()
                    left = self._at - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                    self._at, self.fired = None, True
                    for sock in list(self._socks):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv/send in the request
            except Exception:  # noqa: BLE001 - the watcher must outlive anything (it guards every request)
                time.sleep(0.1)


class InfluxSink:
    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        verify: bool | str = cfg.ca_file if (cfg.verify_tls and cfg.ca_file) else cfg.verify_tls
        auth = None
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.api == 2:
            self.path = "/api/v2/write"
            self.params = {"org": cfg.org, "bucket": cfg.bucket, "precision": "ns"}
            if cfg.token:
                headers["Authorization"] = f"Token {cfg.token}"
        else:
            self.path = "/write"
            self.params = {"db": cfg.database, "precision": "ns"}
            if cfg.retention_policy:
                self.params["rp"] = cfg.retention_policy
            if cfg.username:
                auth = httpx.BasicAuth(cfg.username, cfg.password)
            elif cfg.token:  # InfluxDB 2.x/3.x v1-compatibility with a token
                headers["Authorization"] = f"Token {cfg.token}"
        self.where = f"InfluxDB at {redact_url(cfg.url)}"
        self._deadline = _Deadline()
        self._client = httpx.Client(base_url=cfg.url, timeout=cfg.timeout_s, verify=verify, auth=auth, headers=headers)

    def close(self) -> None:
        self._client.close()

    def write(self, lines: list[str]) -> None:
        """Write one batch. Returns on success, raises a SinkError subclass otherwise."""
        body = ("\n".join(lines) + "\n").encode()
        r = self._request("POST", self.path, self.cfg.timeout_s, params=self.params, content=body)
        self._classify(r)

    def ping(self) -> bool:
        """Is the server there? ``GET /ping`` with a short deadline; any HTTP answer below 500 is yes."""
        try:
            r = self._request("GET", "/ping", min(PING_TIMEOUT_S, self.cfg.timeout_s))
        except SinkError:
            return False
        return r.status_code < 500

    def _request(self, method: str, path: str, limit: float, **kw: object) -> httpx.Response:
        """One request, bounded as a whole by ``limit`` seconds (connect, send, every read)."""
        dl = self._deadline
        dl.arm(limit)
        try:
            return self._client.request(method, path, timeout=min(limit, self.cfg.timeout_s),
                                        extensions={"trace": dl.trace}, **kw)  # type: ignore[arg-type]
        except httpx.TimeoutException:
            raise SinkRetryable(f"{self.where}: no answer within {limit:g} s") from None
        except httpx.TransportError as e:
            if dl.fired:
                raise SinkRetryable(f"{self.where}: no answer within {limit:g} s (the whole request; the "
                                    f"server was answering too slowly)") from None
            raise SinkRetryable(f"{self.where}: {_reason(e)}") from None
        finally:
            dl.disarm()

    def _classify(self, r: httpx.Response) -> None:
        s = r.status_code
        if 200 <= s < 300:
            return
        msg = _server_message(r)
        if s in (400, 422):
            bad = sorted({int(n) - 1 for n in _LINE_RE.findall(msg)})
            raise SinkPermanent(f"{self.where} rejected the data ({s}): {msg}", status=s, bad_lines=bad)
        if s in (401, 403):
            what = "token" if self.cfg.api == 2 or self.cfg.token else "username/password"
            raise SinkAuth(f"{self.where} refused the {what} ({s}): {msg}; fix influxdb credentials "
                           f"(DCMON_INFLUXDB_TOKEN / config.local.toml)", status=s)
        if s == 404:
            target = f"bucket {self.cfg.bucket!r} in org {self.cfg.org!r}" if self.cfg.api == 2 else f"database {self.cfg.database!r}"
            # no "readings stay in the spool" here: the sender says that, with the count, once
            detail = "" if "not found" in msg.lower() else f" ({msg})"   # InfluxDB's own words often say it again
            raise SinkAuth(f"{self.where}: {target} not found{detail}; create it or fix the config", status=s)
        if s == 413:
            raise SinkTooLarge(f"{self.where}: batch too large (413)", status=s)
        if s == 429 or s >= 500:
            raise SinkRetryable(f"{self.where} is unavailable ({s}): {msg}", status=s,
                                retry_after=_retry_after(r.headers.get("Retry-After")))
        raise SinkError(f"{self.where} answered {s}: {msg}", status=s)


def _reason(e: Exception) -> str:
    text = str(e).lower()
    if "refused" in text:
        return "connection refused (is InfluxDB running?)"
    if "name or service" in text or "resolution" in text or "nodename" in text:
        return "host name not found"
    if "certificate" in text or "ssl" in text:
        return "TLS certificate not trusted (set influxdb.ca_file, or verify_tls = false for a test server)"
    return f"connection failed ({type(e).__name__})"


def _server_message(r: httpx.Response) -> str:
    try:
        data = r.json()
        msg = data.get("error") or data.get("message") or r.text
    except ValueError:
        msg = r.text
    msg = " ".join(str(msg).split())
    return msg[:300] if msg else r.reason_phrase


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# ------------------------------------------------------------------------------------------- the output

class InfluxOutput(Output):
    """InfluxDB as an output: durable (the spool at ``spool.path``, drained by a Sender into InfluxSink);
    with ``influxdb.enabled = false`` the spool is kept and not sent, as before outputs were peers. A backlog
    delivered after an outage is downsampled by ``influx_setup.Backfill``."""

    name = "influxdb"
    durable = True

    def __init__(self, cfg: Config) -> None:
        from ..influx_setup import Backfill  # downsamples what a backlog delivered (a no-op before influx-setup)

        self.cfg = cfg
        self.spool_path = cfg.resolve(cfg.spool.path)
        self._sink: Sink | None = None
        if cfg.influxdb.enabled:
            backfill = Backfill(cfg)
            self._sink = backfill.watch(InfluxSink(cfg.influxdb))
            self.on_backlog_sent = backfill

    def sink(self) -> Sink | None:
        return self._sink

    def status(self) -> dict[str, object]:
        return {"enabled": self.cfg.influxdb.enabled, "where": self._sink.where if self._sink else ""}

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def from_config(cfg: Config, ctx: OutputContext) -> Output | None:
    return InfluxOutput(cfg)
