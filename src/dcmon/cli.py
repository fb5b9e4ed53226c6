"""The ``dcmon`` command: the poller and the bench tools, one argparse tree.

Exit status: 0 ok, 1 a runtime error (one line on stderr), 2 bad configuration or usage, 130 interrupted.
No traceback ever reaches the user for an error we know; ``--log-level debug`` shows details.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from . import __version__
from .errors import ConfigError, DcmonError

# Modules that add subcommands (each has add_commands(subparsers)). Kept as a list so each stage of the
# stack owns its own commands.
COMMAND_MODULES = (
    "dcmon.service_cli",  # run, simulate, check-config, status
    "dcmon.tools.scan",       # scan, set-address
    "dcmon.tools.meter",      # shunt, reset-energy, read, watch
    "dcmon.tools.calibrate",  # calibrate, check-accuracy
    "dcmon.tools.spool",      # spool (depth, export, quarantine)
    "dcmon.tools.battery_cmd",  # battery sync
    "dcmon.tools.grafana",    # grafana-import
    "dcmon.influx_setup",  # influx-setup
    "dcmon.outputs.http",  # http-password
)

# The module that adds each command: `dcmon <command>` imports only that one, since the command modules'
# imports (pymodbus, httpx) are nearly all of start-up (seconds on a Pi Zero). --help, --version
# and unknown commands build the whole tree. tests/test_cli.py checks this table against the modules.
COMMAND_OWNERS = {
    **dict.fromkeys(("run", "check-config", "simulate", "status"), "dcmon.service_cli"),
    **dict.fromkeys(("scan", "set-address"), "dcmon.tools.scan"),
    **dict.fromkeys(("shunt", "reset-energy", "read", "watch"), "dcmon.tools.meter"),
    **dict.fromkeys(("calibrate", "check-accuracy"), "dcmon.tools.calibrate"),
    "spool": "dcmon.tools.spool",
    "battery": "dcmon.tools.battery_cmd",
    "grafana-import": "dcmon.tools.grafana",
    "influx-setup": "dcmon.influx_setup",
    "http-password": "dcmon.outputs.http",
}

# Which configuration a command uses, first match wins (docs/configuration.md, "Which file"):
#   1. --config FILE;  2. $DCMON_CONFIG;  3. INSTALLED_CONFIG when the service is installed (the file exists,
#   or /etc/dcmon is there but closed to this user: the installed layout is root:dcmon 0750);
#   4. ./config.toml (a checkout). The chosen file is named by check-config and the poller's first log lines.
INSTALLED_CONFIG = "/etc/dcmon/config.toml"
CHECKOUT_CONFIG = "config.toml"
CONFIG_HELP = ("configuration file (default: $DCMON_CONFIG, else /etc/dcmon/config.toml when installed, "
               "else ./config.toml)")


def default_config(env: Mapping[str, str] | None = None) -> str:
    """The configuration file to use when no --config is given (the order above). Never raises."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if environ.get("DCMON_CONFIG"):
        return environ["DCMON_CONFIG"]
    try:
        os.stat(INSTALLED_CONFIG)
        return INSTALLED_CONFIG
    except PermissionError:   # installed, and this user may not look in: reading it will say what to do
        return INSTALLED_CONFIG
    except OSError:
        return CHECKOUT_CONFIG


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand takes (also accepted before the subcommand)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", default=argparse.SUPPRESS,
                   help=CONFIG_HELP)
    p.add_argument("--log-level", default=argparse.SUPPRESS, choices=("debug", "info", "warning", "error"),
                   help="how much to log (default: the config's poller.log_level, or info)")
    return p


def _command_named(argv: list[str]) -> str | None:
    """The first word that is not an option or the value of a common option."""
    value_next = False
    for a in argv:
        if value_next:
            value_next = False
        elif a in ("--config", "-c", "--log-level"):
            value_next = True
        elif not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command tree; given ``argv`` naming a known command, only that command's module is imported."""
    common = common_parser()
    command = _command_named(argv or [])
    modules = (COMMAND_OWNERS[command],) if command in COMMAND_OWNERS else COMMAND_MODULES
    from .helptext import Formatter, examples

    parser = argparse.ArgumentParser(prog="dcmon", parents=[common], formatter_class=Formatter,
                                     description="PZEM power meters on RS485 → InfluxDB → Grafana. "
                                                 "`dcmon COMMAND --help` explains each command.",
                                     epilog=examples("dcmon run --simulate        # try it without hardware",
                                                     "dcmon status                # is the service healthy?",
                                                     "dcmon scan --bus rs485      # which meters answer?"))
    parser.add_argument("--version", action="version", version=f"dcmon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that stage is not part of this build
                continue
            raise
        mod.add_commands(sub, common)
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the one at set-up: a thread that logs
    after a caller swapped or closed it, as a test's capture does, must not hit a closed file)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: str) -> None:
    """Under systemd: syslog priority prefixes for journald, no timestamps (journald adds them).
    On a terminal: time, level, message."""
    from .systemd import JournalFormatter, under_journal

    handler = _Stderr()
    if under_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    quiet_libraries(level)


# Other libraries' loggers, quieted unless the user asks for debug: httpx logs every request at INFO (one
# journal line per InfluxDB write would drown what matters); pymodbus logs its own view of every timeout at
# ERROR, and we report each failure once, ourselves. With --log-level debug they say everything.
QUIETED = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "pymodbus": logging.CRITICAL}


def quiet_libraries(level: str) -> None:
    for name, quiet in QUIETED.items():
        logging.getLogger(name).setLevel(logging.NOTSET if level.lower() == "debug" else quiet)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = default_config()
    if not hasattr(args, "log_level"):
        args.log_level = None
    setup_logging(args.log_level or "info")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        say_error(f"dcmon: configuration error: {e}")
        return 2
    except DcmonError as e:
        say_error(f"dcmon: error: {e}")
        return 1
    except KeyboardInterrupt:
        print("dcmon: interrupted", file=sys.stderr)
        return 130


def say_error(text: str) -> None:
    """One line on stderr; under systemd with the error priority, so `journalctl -p err` shows it."""
    from .systemd import under_journal

    print(("<3>" if under_journal() else "") + text, file=sys.stderr)


def discard_stdout() -> None:
    """The reader of standard output went away (`dcmon ... | head -1`): what is still to be written goes
    nowhere (else the flush at exit fails too, with a traceback)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_main() -> None:
    try:
        code = main()
    except BrokenPipeError:   # the reader has what it wanted (every command alike; `status` keeps its verdict)
        discard_stdout()
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    run_main()
