"""``dcmon grafana-import`` through the real CLI, against a small HTTP server on 127.0.0.1.

A stand-in, not Grafana: no real Grafana can be installed here (Debian has no grafana package —
`apt-cache policy grafana` shows none — and nothing outside the package registries can be fetched). The
server records every request and answers the few API calls the command makes (data source by uid, folders,
dashboards/db) with the shapes Grafana's HTTP API documents, keeping what was created so a second import
meets an existing folder and data source. Real Grafana behaviour it does not model (permissions, dashboard
validation) is out of its reach; what it pins down is what the command sends.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dcmon.cli import main

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
SECRET = "s3cret-pw"
TOKEN = "glsa_test_token"


class FakeGrafana:
    """Records requests; keeps folders, data sources and dashboards; ``fail`` forces a status per path."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.folders: list[dict] = []
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}
        self.fail: dict[str, tuple[int, dict]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                path = self.path.split("?")[0]
                fake.requests.append({"method": self.command, "path": path, "auth": self.headers.get("Authorization"),
                                      "body": body})
                if path in fake.fail:
                    return self._answer(*fake.fail[path])
                self._answer(*fake.route(self.command, path, body))

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def route(self, method: str, path: str, body: dict | None) -> tuple[int, object]:
        if method == "GET" and path.startswith("/api/datasources/uid/"):
            uid = path.rsplit("/", 1)[1]
            return (200, self.datasources[uid]) if uid in self.datasources else (404, {"message": "Data source not found"})
        if method == "POST" and path == "/api/datasources":
            if any(d["name"] == body["name"] for d in self.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            self.datasources[body["uid"]] = body
            return 200, {"message": "Datasource added", "datasource": body}
        if method == "GET" and path == "/api/folders":
            return 200, self.folders
        if method == "POST" and path == "/api/folders":
            folder = {"id": len(self.folders) + 1, "uid": f"f{len(self.folders) + 1}", "title": body["title"]}
            self.folders.append(folder)
            return 200, folder
        if method == "POST" and path == "/api/dashboards/db":
            d = body["dashboard"]
            self.dashboards[d["uid"]] = body
            return 200, {"status": "success", "uid": d["uid"], "url": f"/d/{d['uid']}/x", "version": 1}
        return 404, {"message": "Not found"}

    def __enter__(self) -> FakeGrafana:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def grafana():
    with FakeGrafana() as g:
        yield g


def write_config(tmp_path: Path, url: str, grafana: str, influx: str = "") -> Path:
    p = tmp_path / "config.toml"
    p.write_text(f"""
[influxdb]
url = "http://influx.example:8086"
database = "power"
username = "grafana_reader"
password = "{SECRET}-influx"
{influx}

[grafana]
url = "{url}"
{grafana}
""")
    return p


def run(cfg: Path, *extra: str) -> int:
    return main(["grafana-import", "--config", str(cfg), "--dashboards", str(DASHBOARDS), *extra])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("DCMON_GRAFANA_TOKEN", "DCMON_GRAFANA_PASSWORD", "DCMON_GRAFANA_URL", "DCMON_INFLUXDB_PASSWORD"):
        monkeypatch.delenv(var, raising=False)


def test_first_import_creates_datasource_folder_and_dashboards_with_a_token(tmp_path, grafana, capsys):
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"')
    assert run(cfg) == 0
    assert {r["auth"] for r in grafana.requests} == {f"Bearer {TOKEN}"}
    ds = grafana.datasources["dcmon-influxdb"]
    assert ds["type"] == "influxdb" and ds["url"] == "http://influx.example:8086"
    assert ds["jsonData"]["dbName"] == "power" and ds["user"] == "grafana_reader"
    assert ds["secureJsonData"] == {"password": f"{SECRET}-influx"}
    assert [f["title"] for f in grafana.folders] == ["DC monitoring"]
    assert set(grafana.dashboards) == {"dcmon-overview", "dcmon-sensor"}
    for uid, body in grafana.dashboards.items():
        assert body["overwrite"] is True and body["folderUid"] == "f1"
        assert body["dashboard"]["id"] is None
        on_disk = json.loads((DASHBOARDS / f"{uid}.json").read_text())
        assert body["dashboard"]["panels"] == on_disk["panels"]
    out = capsys.readouterr().out
    assert "created 'dcmon InfluxDB'" in out and f"{grafana.url}/d/dcmon-overview/x" in out
    assert SECRET not in out and TOKEN not in out


def test_second_import_reuses_folder_and_datasource_with_basic_auth(tmp_path, grafana):
    cfg = write_config(tmp_path, grafana.url, f'username = "admin"\npassword = "{SECRET}"')
    assert run(cfg) == 0
    first = len(grafana.requests)
    assert run(cfg) == 0
    again = grafana.requests[first:]
    assert [(r["method"], r["path"]) for r in again] == [
        ("GET", "/api/datasources/uid/dcmon-influxdb"), ("GET", "/api/folders"),
        ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]
    basic = "Basic " + base64.b64encode(f"admin:{SECRET}".encode()).decode()
    assert {r["auth"] for r in grafana.requests} == {basic}


def test_existing_datasource_uid_is_used_and_references_rewritten(tmp_path, grafana):
    grafana.datasources["my-influx"] = {"uid": "my-influx", "name": "Mine", "type": "influxdb"}
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"\nfolder = ""')
    assert run(cfg, "--datasource-uid", "my-influx") == 0
    assert not any(r["method"] == "POST" and r["path"] == "/api/datasources" for r in grafana.requests)
    assert not any(r["path"] == "/api/folders" for r in grafana.requests)     # '' = General
    for body in grafana.dashboards.values():
        text = json.dumps(body["dashboard"])
        assert "dcmon-influxdb" not in text and '"uid": "my-influx"' in text
        assert "folderUid" not in body


def test_unknown_datasource_uid_is_one_line(tmp_path, grafana, capsys):
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"')
    assert run(cfg, "--datasource-uid", "nope") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and not grafana.dashboards


def test_api_2_datasource_uses_dbrp_and_a_token_header(tmp_path, grafana):
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"',
                       influx='api = 2\norg = "home"\nbucket = "dcmon"\ntoken = "influx-token"')
    assert run(cfg) == 0
    ds = grafana.datasources["dcmon-influxdb"]
    assert ds["jsonData"]["dbName"] == "dcmon" and ds["jsonData"]["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"] == {"httpHeaderValue1": "Token influx-token"}


@pytest.mark.parametrize("path,status,body,expect", [
    ("/api/folders", 401, {"message": "Invalid API key"}, "check grafana.token"),
    ("/api/dashboards/db", 403, {"message": "Access denied"}, "Editor role"),
    ("/api/dashboards/db", 400, {"message": "Cannot save provisioned dashboard"}, "update those files"),
])
def test_refusals_are_one_line_with_the_fix_and_no_secret(tmp_path, grafana, capsys, path, status, body, expect):
    grafana.fail[path] = (status, body)
    cfg = write_config(tmp_path, grafana.url, f'username = "admin"\npassword = "{SECRET}"')
    assert run(cfg) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and str(status) in err
    assert SECRET not in err and "Traceback" not in err


def test_name_clash_with_another_uid_says_use_datasource_uid(tmp_path, grafana, capsys):
    grafana.datasources["other"] = {"uid": "other", "name": "dcmon InfluxDB", "type": "influxdb"}
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"')
    assert run(cfg) == 1
    assert "--datasource-uid" in capsys.readouterr().err


def test_grafana_not_running_is_one_line(tmp_path, capsys):
    with FakeGrafana() as g:
        url = g.url                           # a port that was just free, closed again below
    cfg = write_config(tmp_path, url, f'token = "{TOKEN}"')
    assert run(cfg) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is Grafana running" in err and TOKEN not in err


def test_no_credentials_is_a_configuration_error(tmp_path, grafana, capsys):
    cfg = write_config(tmp_path, grafana.url, "")
    assert run(cfg) == 2
    assert "grafana.token" in capsys.readouterr().err and not grafana.requests


def test_missing_dashboard_folder_names_the_option(tmp_path, grafana, capsys):
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"')
    assert main(["grafana-import", "--config", str(cfg), "--dashboards", str(tmp_path / "none")]) == 1
    assert "--dashboards" in capsys.readouterr().err and not grafana.requests


def test_ui_import_files_are_refused_by_the_api_command(tmp_path, grafana, capsys):
    cfg = write_config(tmp_path, grafana.url, f'token = "{TOKEN}"')
    assert main(["grafana-import", "--config", str(cfg), "--dashboards", str(ROOT / "grafana" / "import")]) == 1
    assert "__inputs" in capsys.readouterr().err and not grafana.requests
