"""Real servers for the tests: Debian's influxd (InfluxDB 1.6, v1 API) and victoria-metrics (speaks the
InfluxDB v2 write API), each on a free 127.0.0.1 port with a temporary data directory, stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not start in {timeout} s: {log.read_text()[-2000:]}")


class _Server:
    """A server process in its own session, so that stop() ends it and anything it started."""

    proc: subprocess.Popen | None = None
    dir: Path

    def _spawn(self, argv: list[str], ready_url: str) -> None:
        log = self.dir / f"{Path(argv[0]).name}.log"
        self.proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(ready_url, self.proc, log)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class Influxd(_Server):
    """influxd (InfluxDB 1.x) on loopback. ``stop()``/``start()`` keep the data directory, for outage tests."""

    def __init__(self, workdir: Path) -> None:
        if not shutil.which("influxd"):
            raise RuntimeError("influxd not installed: apt-get install influxdb (scripts/test.sh does this)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "influxdb.conf"
        self.conf.write_text(f"""
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{self.dir}/meta"
[data]
  dir = "{self.dir}/data"
  wal-dir = "{self.dir}/wal"
  query-log-enabled = false
  trace-logging-enabled = false
[coordinator]
[retention]
  enabled = false
[shard-precreation]
  enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
""")

    def start(self) -> Influxd:
        self._spawn(["influxd", "-config", str(self.conf)], f"{self.url}/ping")
        return self


    def query(self, q: str, db: str = "dcmon") -> list[dict]:
        """Run InfluxQL; return the list of series (each {'name','columns','values', maybe 'tags'})."""
        r = httpx.get(f"{self.url}/query", params={"q": q, "db": db, "epoch": "ns"}, timeout=30)
        r.raise_for_status()
        res = r.json()["results"][0]
        if "error" in res:
            raise RuntimeError(f"{q}: {res['error']}")
        return res.get("series", [])

    def create_db(self, db: str) -> None:
        httpx.post(f"{self.url}/query", params={"q": f'CREATE DATABASE "{db}"'}, timeout=30).raise_for_status()

    def drop_db(self, db: str) -> None:
        httpx.post(f"{self.url}/query", params={"q": f'DROP DATABASE "{db}"'}, timeout=30).raise_for_status()

    def count(self, measurement: str, field: str = "voltage_v", db: str = "dcmon", where: str = "") -> int:
        series = self.query(f'SELECT count("{field}") FROM "{measurement}" {where}', db)
        return int(series[0]["values"][0][1]) if series else 0


class VictoriaMetrics(_Server):
    """victoria-metrics on loopback: accepts InfluxDB line protocol on /write and /api/v2/write."""

    def __init__(self, workdir: Path) -> None:
        if not shutil.which("victoria-metrics"):
            raise RuntimeError("victoria-metrics not installed: apt-get install victoria-metrics")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> VictoriaMetrics:
        self._spawn(["victoria-metrics", f"-storageDataPath={self.dir}/data", f"-httpListenAddr=127.0.0.1:{self.port}",
                     "-retentionPeriod=100y", "-search.disableCache", "-loggerLevel=ERROR"], f"{self.url}/health")
        return self


    def flush(self) -> None:
        httpx.get(f"{self.url}/internal/force_flush", timeout=10)

    def export(self, match: str, series: int = 1) -> list[dict]:
        """Series matching a PromQL selector, via /api/v1/export (JSON lines): once at least ``series`` of
        them are searchable, or what there is after 10 s."""
        import json
        deadline = time.monotonic() + 10
        while True:  # freshly written series become searchable a moment after a flush, not all at once
            self.flush()
            r = httpx.get(f"{self.url}/api/v1/export", params={"match[]": match}, timeout=30)
            r.raise_for_status()
            rows = [json.loads(line) for line in r.text.splitlines() if line.strip()]
            if len(rows) >= series or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def make_ca(workdir: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> dict[str, Path]:
    """A throw-away CA and a server certificate for ``names`` (DNS names or IP addresses), made with the
    openssl command line. Returns the paths: ca, cert, key."""
    if not shutil.which("openssl"):
        raise RuntimeError("openssl not installed: apt-get install openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = workdir / "ca.crt", workdir / "ca.key"
    cert, key, csr, ext = workdir / "server.crt", workdir / "server.key", workdir / "server.csr", workdir / "san.ext"
    sans = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in names)
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n")

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=dcmon test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


class Mosquitto(_Server):
    """Debian's mosquitto on loopback, with persistence in a temporary directory (so that ``stop()`` and
    ``start()`` keep retained messages and persistent sessions, like a real broker restart). Optional:
    ``users`` ({name: password}, written with mosquitto_passwd; anonymous clients are then refused) and
    ``tls`` (make_ca's paths: adds a TLS listener on ``tls_port``)."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 tls: dict[str, Path] | None = None) -> None:
        if not shutil.which("mosquitto"):
            raise RuntimeError("mosquitto not installed: apt-get install mosquitto mosquitto-clients")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.users = dict(users or {})
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            f"persistence true", f"persistence_location {self.dir}/", "autosave_interval 1",
            "log_dest stdout", "log_type error", "log_type warning", "log_type notice",
            f"listener {self.port} 127.0.0.1",
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else mosquitto drops to user "mosquitto", who cannot read self.dir
        if self.users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for name, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), name, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                      f"keyfile {tls['key']}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        log = self.dir / "mosquitto.log"
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        ports = [p for p in (self.port, self.tls_port) if p]
        while ports:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", ports[0]), timeout=0.5):
                    ports.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {ports} in 15 s: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def client_args(self, user: str | None = None) -> list[str]:
        """Host, port (and credentials) for mosquitto_sub / mosquitto_pub."""
        args = ["-h", "127.0.0.1", "-p", str(self.port)]
        if user is None and self.users:
            user = next(iter(self.users))
        if user:
            args += ["-u", user, "-P", self.users[user]]
        return args


class Prometheus(_Server):
    """Debian's prometheus on loopback, scraping ``targets`` (host:port) every ``interval``, with a temporary
    config and data directory. ``query()`` runs PromQL on /api/v1/query."""

    def __init__(self, workdir: Path, targets: list[str], *, interval: str = "1s",
                 basic_auth: tuple[str, str] | None = None) -> None:
        if not shutil.which("prometheus"):
            raise RuntimeError("prometheus not installed: apt-get install prometheus (scripts/test.sh does this)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "prometheus.yml"
        auth = ""
        if basic_auth:
            (self.dir / "scrape_password").write_text(basic_auth[1])
            auth = (f"    basic_auth:\n      username: {basic_auth[0]!r}\n"
                    f"      password_file: {str(self.dir / 'scrape_password')!r}\n")
        self.conf.write_text(f"""global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
scrape_configs:
  - job_name: dcmon
{auth}    static_configs:
      - targets: {targets!r}
""")

    def start(self) -> Prometheus:
        self._spawn(["prometheus", f"--config.file={self.conf}", f"--storage.tsdb.path={self.dir}/data",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], f"{self.url}/-/ready")
        return self

    def query(self, q: str) -> list[dict]:
        """The instant vector of a PromQL query: [{'metric': {...}, 'value': [t, 'v']}, ...]."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": q}, timeout=10)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{q}: {body}")
        return body["data"]["result"]

    def wait_for(self, q: str, check, timeout: float = 20.0) -> list[dict]:
        """Query until ``check(result)`` is true; return that result (or raise with the last one)."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(q)
            if check(res):
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"{q}: still {res} after {timeout} s")
            time.sleep(0.25)
