"""The command tree: every command is owned by the module that adds it, and a command imports only its own."""

from __future__ import annotations

import os
import subprocess
import sys

from dcmon import cli


def test_owner_table_matches_the_modules():
    full = cli.build_parser([])
    sub = next(a for a in full._actions if a.dest == "command")  # noqa: SLF001 - argparse has no public accessor
    assert set(sub.choices) == set(cli.COMMAND_OWNERS)
    for command, module in cli.COMMAND_OWNERS.items():
        only = cli.build_parser([command])
        sub = next(a for a in only._actions if a.dest == "command")  # noqa: SLF001
        assert command in sub.choices, (command, module)


def test_common_options_before_the_command_are_skipped():
    assert cli._command_named(["--config", "x.toml", "--log-level", "debug", "spool", "status"]) == "spool"  # noqa: SLF001
    assert cli._command_named(["--help"]) is None  # noqa: SLF001


def test_a_command_does_not_import_the_others():
    code = ("import sys; from dcmon import cli; cli.build_parser(['spool']); "
            "print(' '.join(m for m in ('dcmon.tools.target', 'dcmon.tools.scan', 'dcmon.tools.grafana', 'dcmon.bus', "
            "'dcmon.poller', 'dcmon.service', 'pymodbus', 'httpx') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_unknown_command_is_a_usage_error_listing_the_commands():
    r = subprocess.run([sys.executable, "-m", "dcmon.cli", "scna"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "scan" in r.stderr and "Traceback" not in r.stderr


def test_other_libraries_are_quiet_above_debug_and_speak_at_debug(capsys):
    """No module silences pymodbus or httpx at import; the command line does, unless --log-level debug."""
    import logging

    from dcmon.simulator import SimMeter, Simulator
    from dcmon.models import PZEM017

    with Simulator([SimMeter(PZEM017, 1, steady=True)]) as sim:
        assert cli.main(["read", "--port", sim.path, "--address", "1", "--log-level", "info"]) == 0
        quiet = capsys.readouterr().err
        assert logging.getLogger("pymodbus").level == logging.CRITICAL
        assert logging.getLogger("httpx").level == logging.WARNING
        assert cli.main(["read", "--port", sim.path, "--address", "1", "--log-level", "debug"]) == 0
        loud = capsys.readouterr().err
    assert logging.getLogger("pymodbus").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG
    assert "decoded PDU" not in quiet and "Processing:" not in quiet
    assert "decoded PDU" in loud and "ReadInputRegistersResponse" in loud   # pymodbus's own view of the frames
    cli.quiet_libraries("info")


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """A thread that logs after stderr was swapped (a test's capture closed, a redirect) writes to the new one,
    never to a closed file ("--- Logging error ---" on the real stderr)."""
    import io
    import logging

    from dcmon.cli import setup_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging("info")
    logging.getLogger("dcmon.test").info("one")
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("dcmon.test").info("two")
    assert "INFO    two" in second.getvalue()


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    """`dcmon status | head -1` and the like: the reader closes the pipe before dcmon has written; every
    command ends quietly (exit 0), never with a BrokenPipeError traceback."""
    import subprocess
    import sys

    cfg = tmp_path / "config.toml"
    cfg.write_text('[buses.a]\nport = "/dev/null"\n[[sensors]]\nname = "x"\nbus = "a"\naddress = 1\n')
    for cmd in (["check-config", "--config", str(cfg)], ["--help"]):
        r = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | true', "sh", sys.executable, "-m", "dcmon.cli", *cmd],
                           capture_output=True, text=True, timeout=60)
        assert "Traceback" not in r.stderr and r.returncode == 0, (cmd, r.returncode, r.stderr)
    # `dcmon status` keeps its verdict as the exit status (no status file: CRITICAL, 2), however early the
    # reader leaves: a monitoring script with pipefail must not read "OK"
    cfg.write_text(f'[spool]\npath = "{tmp_path}/spool.sqlite"\n' + cfg.read_text())
    for reader in ("true", "head -c 1", "cat"):
        r = subprocess.run(["bash", "-c", f'set -o pipefail; "$@" | {reader} >/dev/null', "sh", sys.executable, "-m",
                            "dcmon.cli", "status", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DCMON_STATUS_PATH": str(tmp_path / "none" / "status.json")})
        assert "Traceback" not in r.stderr and r.returncode == 2, (reader, r.returncode, r.stderr)


def test_a_killed_poller_not_yet_reaped_is_not_running():
    """kill -9, and its parent has not reaped it yet (a zombie): `dcmon status` must say not running."""
    import subprocess
    import time

    from dcmon.service_cli import _pid_alive

    p = subprocess.Popen(["sleep", "30"])
    try:
        assert _pid_alive(p.pid)
        p.kill()
        deadline = time.monotonic() + 10
        while _pid_alive(p.pid) and time.monotonic() < deadline:   # not reaped: os.kill(pid, 0) still succeeds
            time.sleep(0.05)
        assert not _pid_alive(p.pid)
        assert p.poll() is not None   # (reaped only now)
    finally:
        p.kill()
        p.wait()
