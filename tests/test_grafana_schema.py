"""The dashboards against Grafana's own published schema: @grafana/schema's TypeScript types, checked by tsc.

@grafana/schema (Apache-2.0, published by Grafana Labs from the CUE schemas Grafana validates dashboards
with) is the only well-kept offline form of Grafana's dashboard schema; no Python library validates it
(grafana-foundation-sdk's ``from_json`` accepts anything). The test installs exact versions with npm into a
temporary folder (npm's own cache makes later runs quick), writes each dashboard, annotation and panel as a
typed TypeScript constant and runs ``tsc --noEmit``. TypeScript's excess-property and literal checks then
catch a misspelt key, an option of the wrong panel type, or a value outside an enum — in the dashboard
model and in the options and field config of the timeseries, stat, gauge and state-timeline panels.

JSON carries an enum's value, not the enum, so ``Loose<T>`` turns each string enum into the union of its
values; datasource queries are typed as Grafana types them (``DataQuery`` plus plugin-specific keys).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "@grafana/schema@13.2.3"
TYPESCRIPT = "typescript@5.9.3"
PANEL_TYPES = {
    "timeseries": "Typed<TimeSeries.Options, TimeSeries.FieldConfig>",
    "stat": "Typed<Stat.Options, {}>",
    "gauge": "Typed<Gauge.Options, {}>",
    "state-timeline": "Typed<StateTimeline.Options, StateTimeline.FieldConfig>",
    "row": "RowPanel",
}
HEADER = """\
import type { AnnotationQuery, DataQuery, Dashboard, FieldConfigSource, Panel, RowPanel } from '@grafana/schema';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';

type Loose<T> = T extends string ? `${T}` : T extends number ? number : T extends boolean ? boolean
  : T extends Array<infer U> ? Array<Loose<U>> : T extends object ? { [K in keyof T]: Loose<T[K]> } : T;
type Typed<O, C> = Omit<Panel, 'options' | 'fieldConfig'> & { options: O; fieldConfig: FieldConfigSource<C> };
type PluginQuery = DataQuery & Record<string, unknown>;
"""


@pytest.fixture(scope="module")
def tsc(tmp_path_factory) -> tuple[Path, Path]:
    npm = shutil.which("npm")
    assert npm, "npm is needed for the schema check: apt-get install nodejs npm"
    d = tmp_path_factory.mktemp("grafana-schema")
    r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(d), SCHEMA, TYPESCRIPT],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"npm install {SCHEMA} {TYPESCRIPT} failed: {r.stderr[-2000:]}"
    (d / "tsconfig.json").write_text(json.dumps({"compilerOptions": {
        "strict": True, "noEmit": True, "module": "esnext", "moduleResolution": "bundler", "target": "es2022",
        "skipLibCheck": True}, "files": ["check.ts"]}))
    return d, d / "node_modules" / ".bin" / "tsc"


def typescript_for(dashboards: dict[str, dict]) -> str:
    out = [HEADER]
    for name, dash in dashboards.items():
        var = name.removesuffix(".json").replace("-", "_")
        out.append(f"export const {var}: Loose<Dashboard> = {json.dumps({**dash, 'panels': [], 'annotations': {'list': []}})};")
        for i, a in enumerate(dash["annotations"]["list"]):
            out.append(f"export const {var}_a{i}: Loose<AnnotationQuery<PluginQuery>> = {json.dumps(a)};")
        for p in dash["panels"]:
            assert p["type"] in PANEL_TYPES, f"{name}: no schema check for panel type {p['type']}"
            out.append(f"export const {var}_p{p['id']}: Loose<{PANEL_TYPES[p['type']]}> = {json.dumps(p)};")
    return "\n".join(out) + "\n"


def check(tsc: tuple[Path, Path], dashboards: dict[str, dict]) -> subprocess.CompletedProcess:
    d, binary = tsc
    (d / "check.ts").write_text(typescript_for(dashboards))
    return subprocess.run([str(binary), "-p", str(d)], capture_output=True, text=True, timeout=300)


def dashboards() -> dict[str, dict]:
    return {f.name: json.loads(f.read_text(encoding="utf-8")) for f in sorted((ROOT / "grafana/dashboards").glob("*.json"))}


def test_dashboards_match_grafanas_published_schema(tsc):
    r = check(tsc, dashboards())
    assert r.returncode == 0, r.stdout[-4000:]


def test_the_schema_check_catches_a_misspelt_option_and_a_bad_enum_value(tsc):
    """The check above can fail: the same dashboards with two typical mistakes do not pass."""
    dash = dashboards()
    overview = dash["dcmon-overview.json"]
    stat = next(p for p in overview["panels"] if p["type"] == "stat")
    stat["options"]["colourMode"] = stat["options"].pop("colorMode")
    graph = next(p for p in overview["panels"] if p["type"] == "timeseries")
    graph["fieldConfig"]["defaults"]["custom"]["drawStyle"] = "columns"
    r = check(tsc, dash)
    assert r.returncode != 0
    assert "colourMode" in r.stdout and "columns" in r.stdout
