"""The documentation against the code: every command line it shows parses with the CLI as built, every config key
it names exists, every relative link resolves.

Docs rot silently: a renamed option still reads well in prose. These tests read README.md and docs/*.md the way a
user copies from them (fenced code blocks and inline code), and hand each command line to the real argparse tree
(`dcmon.cli.build_parser`). Nothing runs: parsing only, so no hardware or server is needed.
docs/configuration.md's key table and the links of install/wiring/troubleshooting/configuration.md are checked by
tests/test_deploy.py; this file covers the rest and does not repeat them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcmon import cli
from dcmon import config as c
from dcmon.schema import keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# How a command line starts in the docs → the argv prefix it stands for (the poller script is `dcmon run`).
PREFIXES: list[tuple[list[str], list[str]]] = [
    (["sudo", "-u", "dcmon", "dcmon"], []),
    (["sudo", "dcmon"], []),
    (["/opt/dcmon/venv/bin/dcmon"], []),
    (["dcmon"], []),
    (["python3", "scripts/poll_to_influx.py"], ["run"]),
]
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…")
STARTS_LIKE_COMMAND = re.compile(r"(%s)(\s|$)" % "|".join(re.escape(" ".join(p)) for p, _ in PREFIXES))

# Command lines that cannot be parsed as written, with the reason. (file name, command text as in the doc).
# A stale entry (no longer in the docs) fails the test, so this list stays honest.
SKIP = {
    ("troubleshooting.md", "sudo -u dcmon dcmon ..."): "prose: 'run the tool as the service user', any command",
    ("grafana.md", "dcmon InfluxDB"): "the name of the Grafana data source, not a command",
}


@dataclass(frozen=True)
class Code:
    """One piece of code as a user sees it: a line of a fenced block, or an inline code span."""

    doc: Path
    line: int
    text: str
    fenced: bool

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def code_in(doc: Path) -> list[Code]:
    """Fenced block lines and inline spans outside fences (CommonMark enough for these docs: ``` or ~~~ fences,
    possibly indented in a list, and backtick spans on one line)."""
    out: list[Code] = []
    fence: str | None = None
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1) if fence is None else None
        elif fence is not None:
            out.append(Code(doc, n, line.strip(), True))
        else:
            out += [Code(doc, n, s.group(2).strip(), False) for s in re.finditer(r"(`+)(.+?)\1", line)]
    return out


@dataclass(frozen=True)
class Command:
    code: Code
    text: str         # as in the doc (the segment between shell operators, comment stripped)
    argv: list[str]   # for dcmon.cli


def commands_in(code: Code) -> list[Command]:
    """The dcmon command lines in one piece of code: split with shlex (comments dropped), cut at shell operators
    (`a && dcmon ...`, `dcmon ... | jq`), and keep the segments that start like a dcmon command.
    Usage notation `[--opt]` counts as the option itself."""
    try:
        tokens = shlex.split(code.text, comments=True)
    except ValueError:  # unbalanced quotes: prose in backticks, not a command; a fenced one is reported below
        return [Command(code, code.text, [])] if STARTS_LIKE_COMMAND.match(code.text) else []
    segments: list[list[str]] = [[]]
    for t in tokens:
        if t in SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(t)
    found = []
    for seg in segments:
        for prefix, argv_prefix in PREFIXES:
            n = len(prefix)
            if seg[:n] == prefix and (len(seg) > n or argv_prefix):
                args = [t[1:-1] if re.fullmatch(r"\[[^\]]+\]", t) else t for t in seg[n:]]
                found.append(Command(code, shlex.join(seg), argv_prefix + args))
                break
    return found


def all_commands() -> list[Command]:
    return [cmd for doc in DOCS for code in code_in(doc) for cmd in commands_in(code)]


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about argv, or None when it parses (or prints help/version and exits 0)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.build_parser(argv).parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                return (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    return None


def test_the_docs_show_commands_at_all():
    """Guards the extraction itself: if the scanner broke, every other check here would pass on nothing."""
    found = all_commands()
    assert len(found) > 30, [c.text for c in found]
    assert any(c.argv[:1] == ["run"] and c.code.doc.name == "README.md" for c in found)
    assert {c.code.doc.name for c in found} >= {"README.md", "commissioning.md", "install.md", "troubleshooting.md"}


def test_every_documented_command_parses():
    """Fenced lines are what users paste: they must parse fully. Inline code may name a command without its
    required arguments (`dcmon spool`, `dcmon shunt set`), but never an unknown command or option."""
    failures, skipped = [], set()
    for cmd in all_commands():
        key = (cmd.code.doc.name, cmd.text)
        if key in SKIP:
            skipped.add(key)
            continue
        if not cmd.argv or any(PLACEHOLDER.search(t) for t in cmd.argv):
            failures.append(f"{cmd.code.where()}: `{cmd.text}` has a placeholder or cannot be split; "
                            "write it out or add it to SKIP in tests/test_docs.py with the reason")
            continue
        error = parse_error(cmd.argv)
        if error and not (not cmd.code.fenced and "arguments are required" in error):
            failures.append(f"{cmd.code.where()}: `{cmd.text}` → {error}")
    assert failures == [], "\n".join(failures)
    assert skipped == set(SKIP), f"SKIP entries no longer in the docs: {set(SKIP) - skipped}"


def test_the_parse_check_can_fail():
    """The check above really rejects what argparse rejects, and accepts what it accepts."""
    assert parse_error(["run", "--no-such-option"])
    assert parse_error(["no-such-command"])
    assert "arguments are required" in (parse_error(["shunt", "set"]) or "")
    assert parse_error(["run", "--simulate", "--once"]) is None
    assert parse_error(["--help"]) is None
    code = Code(ROOT / "README.md", 1, "sudo systemctl stop dcmon && sudo dcmon scan --range 1-3  # x", True)
    assert [c.argv for c in commands_in(code)] == [["scan", "--range", "1-3"]]
    assert commands_in(Code(ROOT / "README.md", 1, "dcmon: error: bus 'rs485': can't", True)) == []
    code = Code(ROOT / "README.md", 1, "python3 scripts/poll_to_influx.py [--once]", False)
    assert [c.argv for c in commands_in(code)] == [["run", "--once"]]


# ----------------------------------------------------------------------------------------------- config keys

TABLES = {"poller": c.PollerConfig, "spool": c.SpoolConfig, "influxdb": c.InfluxConfig, "grafana": c.GrafanaConfig,
          "mqtt": c.MqttConfig, "http": c.HttpConfig,
          "buses": c.BusConfig, "sensors": c.SensorConfig, "sensors.calibration": c.Calibration,
          "models": c.ModelConfig, "batteries": c.BatterySettings}
# `[table]`, `[[table]]`, `[buses.NAME]`, optionally followed by a key: `[influxdb] token_file`
SECTION = re.compile(r"\[\[?(?P<table>[a-z][a-z_.]*?)(?:\.NAME)?\]\]?(?:\s+(?P<key>[a-z_*]+))?(?:\s*=.*)?")
# `poller.apply_shunt_codes`, `influxdb.measurement*`, `sensors.calibration.voltage_gain = 1.01`
DOTTED = re.compile(r"(?P<table>(?:%s)(?:\.NAME)?(?:\.calibration)?)\.(?P<key>[a-z_*]+)(?:\s*=.*)?"
                    % "|".join(t for t in TABLES if "." not in t))


def config_key_problem(text: str) -> str | None:
    """Why an inline `table.key` / `[table] key` names nothing in dcmon.config, or None if it is fine or is not
    a config reference at all."""
    m = SECTION.fullmatch(text) or DOTTED.fullmatch(text)
    if not m:
        return None
    table = m.group("table").replace(".NAME", "")
    if table not in TABLES:
        return f"no table [{table}] in dcmon.config (tables: {', '.join(TABLES)})"
    key = m.group("key")
    if key and not fnmatch.filter(keys(TABLES[table]), key):
        return f"no key {key!r} in [{table}] (keys: {', '.join(keys(TABLES[table]))})"
    return None


def test_config_keys_named_in_the_docs_exist():
    """Keys named in prose (`poller.settle_s`) must exist; docs/configuration.md has its own, stricter test."""
    failures, seen = [], 0
    for doc in DOCS:
        if doc.name == "configuration.md":
            continue
        for code in code_in(doc):
            if code.fenced:
                continue
            if SECTION.fullmatch(code.text) or DOTTED.fullmatch(code.text):
                seen += 1
            problem = config_key_problem(code.text)
            if problem:
                failures.append(f"{code.where()}: `{code.text}`: {problem}")
    assert failures == [], "\n".join(failures)
    assert seen > 5, "no config keys found in the docs: is the scanner broken?"


@pytest.mark.parametrize("text, bad", [
    ("poller.apply_shunt_codes = true", False), ("influxdb.measurement*", False), ("[buses.NAME]", False),
    ("[[sensors]]", False), ("[influxdb] token_file", False), ("sensors.calibration.voltage_gain", False),
    ("poller.no_such_key", True), ("[influxdb] tokenfile", True), ("[nosuch]", True), ("spool.nothing*", True),
    ("dcmon.config", False), ("var/spool.sqlite", False),
])
def test_config_key_check_can_fail(text, bad):
    assert (config_key_problem(text) is not None) == bad, config_key_problem(text)


# ----------------------------------------------------------------------------------------------------- links

# tests/test_deploy.py::test_docs_links_resolve covers these.
LINKS_CHECKED_ELSEWHERE = {"install.md", "wiring.md", "troubleshooting.md", "configuration.md"}


def test_relative_links_resolve():
    """Every relative link or image in README.md and the docs not covered by test_deploy names a real file."""
    failures, seen = [], 0
    for doc in DOCS:
        if doc.parent.name == "docs" and doc.name in LINKS_CHECKED_ELSEWHERE:
            continue
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(\s*<?([^)#\s>]+)>?(?:#[^)]*)?\)", line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                seen += 1
                if not (doc.parent / target).exists():
                    failures.append(f"{doc.relative_to(ROOT)}:{n}: link to missing {target}")
    assert failures == [], "\n".join(failures)
    assert seen > 0, "no relative links found: is the scanner broken?"
