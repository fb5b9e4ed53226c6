"""``dcmon grafana-import``: load dcmon's dashboards into a running Grafana through its HTTP API.

For a Grafana you do not provision from files (docs/grafana.md has all three ways). It uses the ``[grafana]``
section of the configuration: ``url``, and either ``token`` (a service-account token, sent as a Bearer token)
or ``username``/``password`` (basic auth). Steps, each one request:

1. the data source: the dashboards name theirs by the pinned uid ``dcmon-influxdb``. If Grafana has none
   with that uid, one is created from the ``[influxdb]`` section (InfluxQL; api = 2 uses a DBRP mapping
   and a Token header). ``--datasource-uid UID`` uses an existing InfluxDB data source instead and rewrites
   the dashboards' references to it;
2. the folder (``grafana.folder``; empty = Grafana's "General"), created when missing;
3. each dashboard, ``POST /api/dashboards/db`` with ``overwrite``: importing again updates in place,
   because the dashboard uids never change.

Errors are one line naming the step and what to do; credentials never appear in them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import httpx

from ..config import Config, load
from ..errors import ConfigError, GrafanaError
from ..helptext import Formatter


DS_UID = "dcmon-influxdb"        # grafana/provisioning/datasources/dcmon.yaml pins the same uid
DS_NAME = "dcmon InfluxDB"


def dashboard_dirs() -> list[Path]:
    """Where the dashboards are looked for when ``--dashboards`` is not given: the current folder's
    checkout, the checkout this module runs from (editable install), the installed tree."""
    return [Path.cwd() / "grafana" / "dashboards",
            Path(__file__).resolve().parents[2] / "grafana" / "dashboards",
            Path("/opt/dcmon/grafana/dashboards")]


def load_dashboards(folder: str | None) -> list[dict[str, Any]]:
    candidates = [Path(folder)] if folder else dashboard_dirs()
    for d in candidates:
        files = sorted(d.glob("*.json")) if d.is_dir() else []
        if files:
            break
    else:
        where = folder or ", ".join(str(c) for c in candidates)
        raise GrafanaError(f"no dashboard files (*.json) in {where}; pass --dashboards DIR (the project's grafana/dashboards)")
    out = []
    for f in files:
        try:
            dash = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GrafanaError(f"{f}: cannot read the dashboard: {e}") from None
        if not isinstance(dash, dict) or not dash.get("uid") or "__inputs" in dash:
            raise GrafanaError(f"{f}: not a dcmon dashboard for the API (needs a uid and no __inputs); "
                               "use the files in grafana/dashboards")
        out.append(dash)
    return out


def use_datasource(dash: dict[str, Any], uid: str) -> dict[str, Any]:
    """The dashboard with every reference to the pinned data source uid pointing at ``uid`` instead."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "influxdb" and node.get("uid") == DS_UID and set(node) <= {"type", "uid"}:
                return {"type": "influxdb", "uid": uid}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(dash)


def datasource_body(cfg: Config) -> dict[str, Any]:
    """An InfluxQL data source for the ``[influxdb]`` section. InfluxDB 2.x answers InfluxQL through a DBRP
    mapping whose database name is taken to be the bucket's name (docs/grafana.md shows how to create it)."""
    ix = cfg.influxdb
    body: dict[str, Any] = {
        "name": DS_NAME, "uid": DS_UID, "type": "influxdb", "access": "proxy", "url": ix.url,
        "jsonData": {"httpMode": "POST", "timeInterval": f"{max(1.0, cfg.poller.interval_s):g}s",
                     "tlsSkipVerify": not ix.verify_tls},
        "secureJsonData": {},
    }
    if ix.api == 2:
        body["jsonData"].update(dbName=ix.bucket, httpHeaderName1="Authorization")
        if ix.token:
            body["secureJsonData"]["httpHeaderValue1"] = f"Token {ix.token}"
    else:
        body["jsonData"]["dbName"] = ix.database
        if ix.username:
            body["user"] = ix.username
            body["secureJsonData"]["password"] = ix.password
    return body


class Grafana:
    """The few Grafana HTTP API calls the import needs."""

    def __init__(self, cfg: Config, timeout_s: float = 15.0) -> None:
        g = cfg.grafana
        self.url = g.url.rstrip("/")
        headers = {"Accept": "application/json"}
        auth = None
        if g.token:
            headers["Authorization"] = f"Bearer {g.token}"
        else:
            auth = httpx.BasicAuth(g.username, g.password)
        self.http = httpx.Client(base_url=self.url, headers=headers, auth=auth, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Grafana:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, what: str, *, body: Any = None, accept: tuple[int, ...] = ()) -> httpx.Response:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise GrafanaError(f"Grafana at {self.url}: {what}: {type(e).__name__} (is Grafana running? check grafana.url)") from None
        if r.is_success or r.status_code in accept:
            return r
        raise GrafanaError(f"Grafana at {self.url}: {what}: {explain(r)}")

    # --------------------------------------------------------------------------------- steps
    def datasource_exists(self, uid: str) -> bool:
        r = self.call("GET", f"/api/datasources/uid/{uid}", f"looking up data source {uid!r}", accept=(404,))
        return r.status_code != 404

    def create_datasource(self, body: dict[str, Any]) -> None:
        r = self.call("POST", "/api/datasources", f"creating data source {body['name']!r}", body=body, accept=(409,))
        if r.status_code == 409:
            raise GrafanaError(f"Grafana at {self.url}: a data source named {body['name']!r} exists with another uid; "
                               "pass --datasource-uid with its uid (Connections → Data sources → the URL shows it)")

    def folder_uid(self, title: str) -> str | None:
        """The uid of the folder with this title, created if missing; None for Grafana's General folder."""
        if not title:
            return None
        r = self.call("GET", "/api/folders", "listing folders")
        for f in r.json():
            if f.get("title") == title:
                return str(f["uid"])
        r = self.call("POST", "/api/folders", f"creating folder {title!r}", body={"title": title})
        return str(r.json()["uid"])

    def put_dashboard(self, dash: dict[str, Any], folder_uid: str | None) -> str:
        body: dict[str, Any] = {"dashboard": {**dash, "id": None}, "overwrite": True,
                                "message": "dcmon grafana-import"}
        if folder_uid:
            body["folderUid"] = folder_uid
        r = self.call("POST", "/api/dashboards/db", f"saving dashboard {dash.get('title', dash['uid'])!r}", body=body)
        return self.url + str(r.json().get("url", f"/d/{dash['uid']}"))


def explain(r: httpx.Response) -> str:
    """One line for a refused request: the status, Grafana's own message, and the fix we know of."""
    try:
        message = str(r.json().get("message", ""))
    except ValueError:
        message = r.text.strip().splitlines()[0] if r.text.strip() else ""
    message = " ".join(message.split())[:200]          # one line, whatever the server sent
    text = f"{r.status_code} {message or r.reason_phrase}".strip()
    if r.status_code == 401:
        return text + " (check grafana.token, or grafana.username and grafana.password)"
    if r.status_code == 403:
        return text + (" (the user or service account needs the Editor role for dashboards and folders, "
                       "Admin to create a data source; or pass --datasource-uid)")
    if "provisioned" in message.lower():
        return text + " (that Grafana loads this dashboard from files: update those files instead)"
    return text


# ------------------------------------------------------------------------------------------ command

def cmd_grafana_import(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.log_level != "debug":      # httpx logs every request at INFO: noise here, details under debug
        logging.getLogger("httpx").setLevel(logging.WARNING)
    g = cfg.grafana
    if not g.token and not g.password:
        raise ConfigError(cfg.source, "grafana.token", "no credentials: grafana.token and grafana.password are both empty",
                          "set a service-account token (DCMON_GRAFANA_TOKEN) or the password (DCMON_GRAFANA_PASSWORD)")
    dashboards = load_dashboards(args.dashboards)
    folder = g.folder if args.folder is None else args.folder
    with Grafana(cfg) as api:
        if args.datasource_uid:
            if not api.datasource_exists(args.datasource_uid):
                raise GrafanaError(f"Grafana at {api.url} has no data source with uid {args.datasource_uid!r}; "
                                   "copy the uid from the data source's page URL")
            dashboards = [use_datasource(d, args.datasource_uid) for d in dashboards]
            print(f"data source: using {args.datasource_uid!r}")
        elif api.datasource_exists(DS_UID):
            print(f"data source: {DS_UID!r} already there (left as it is)")
        else:
            api.create_datasource(datasource_body(cfg))
            print(f"data source: created {DS_NAME!r} ({DS_UID}) for {cfg.influxdb.url}")
        folder_uid = api.folder_uid(folder)
        for dash in dashboards:
            url = api.put_dashboard(dash, folder_uid)
            print(f"imported {dash.get('title', dash['uid'])!r} into {folder or 'General'!r}: {url}")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("grafana-import", parents=[common], formatter_class=Formatter,
                       help="load the dashboards (and, if missing, the data source) into Grafana via its HTTP API",
                       description="Load dcmon's dashboards into a running Grafana through its HTTP API, and create "
                                   "the InfluxDB data source when it is missing. Grafana's URL and credentials come "
                                   "from [grafana] in the config (or DCMON_GRAFANA_TOKEN). Importing again replaces "
                                   "the dashboards.",
                       epilog="examples:\n  dcmon grafana-import\n  dcmon grafana-import --folder Energy "
                              "--datasource-uid my-influx")
    p.add_argument("--dashboards", metavar="DIR", default=None,
                   help="folder with the dashboard JSON files (default: grafana/dashboards of this checkout)")
    p.add_argument("--folder", default=None, help="Grafana folder to import into (default: grafana.folder; '' = General)")
    p.add_argument("--datasource-uid", metavar="UID", default=None,
                   help="use this existing InfluxDB (InfluxQL) data source instead of creating 'dcmon InfluxDB'")
    p.set_defaults(func=cmd_grafana_import)
