"""``dcmon spool``: look into the spool (depth, oldest reading, drops, quarantine, last error), export it
as line protocol, and deal with quarantined lines. Safe while ``dcmon run`` is running (SQLite WAL lets both
use the file); it never moves or repairs the file itself: ``dcmon run`` does that at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from .. import config as config_mod
from ..errors import DcmonError
from ..errors import SpoolError
from ..spool import Spool
from ..helptext import Formatter


def _ex(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    fmt = Formatter
    p = subparsers.add_parser("spool", parents=[common], formatter_class=fmt,
                              help="show the local queue of readings; export it; handle quarantined lines",
                              description="Readings wait in the spool (spool.path) until InfluxDB has them. "
                                          "Without a subcommand: the status. Safe while the poller runs. The "
                                          "installed spool belongs to the dcmon user: run these as that user.",
                              epilog=_ex("sudo -u dcmon dcmon spool", "sudo -u dcmon dcmon spool export -o backlog.lp"))
    p.set_defaults(func=cmd_status, json=False)
    sub = p.add_subparsers(dest="spool_command", metavar="status|export|quarantine")

    s = sub.add_parser("status", parents=[common], formatter_class=fmt,
                       help="depth, oldest reading, size, drops, quarantine, last error",
                       description="How many readings wait for InfluxDB, the oldest of them, the spool's size and "
                                   "limits, what was dropped or quarantined, and the sender's last error.",
                       epilog=_ex("dcmon spool status", "dcmon spool status --json"))
    s.add_argument("--json", action="store_true", help="machine-readable")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("export", parents=[common], formatter_class=fmt,
                       help="write the queued (or quarantined) lines as line protocol",
                       description="Oldest first, one line per reading, nanosecond timestamps. To load a file into "
                                   "InfluxDB 1.x by hand:\n  curl --data-binary @FILE "
                                   "'http://HOST:8086/write?db=dcmon&precision=ns'",
                       epilog=_ex("dcmon spool export -o backlog.lp", "dcmon spool export --quarantine"))
    e.add_argument("--quarantine", action="store_true", help="export the quarantined lines instead")
    e.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: standard output)")
    e.set_defaults(func=cmd_export)

    q = sub.add_parser("quarantine", parents=[common], formatter_class=fmt,
                       help="lines InfluxDB refused: list, retry or clear them",
                       description="Lines InfluxDB refused for good (400: a bad value or a field type conflict) are "
                                   "set aside so the rest keeps flowing. List them and why, put them back after "
                                   "fixing the cause, or delete them.",
                       epilog=_ex("dcmon spool quarantine list", "dcmon spool quarantine retry"))
    qs = q.add_subparsers(dest="quarantine_command", metavar="list|retry|clear")
    qs.required = True
    ql = qs.add_parser("list", parents=[common], formatter_class=fmt,
                       help="show the quarantined lines and why they were refused",
                       description="Each quarantined line, when it was set aside and InfluxDB's reason.",
                       epilog=_ex("dcmon spool quarantine list --limit 10"))
    ql.add_argument("--limit", type=int, default=50, metavar="N", help="show at most N (default 50; 0 = all)")
    ql.set_defaults(func=cmd_quarantine_list)
    qr = qs.add_parser("retry", parents=[common], formatter_class=fmt,
                       help="put them back in the queue (after fixing the cause)",
                       description="Move every quarantined line back into the queue; a running poller sends them "
                                   "within seconds, and any still refused come back to the quarantine.",
                       epilog=_ex("dcmon spool quarantine retry"))
    qr.set_defaults(func=cmd_quarantine_retry)
    qc = qs.add_parser("clear", parents=[common], formatter_class=fmt,
                       help="delete them for good (export them first)",
                       description="Delete every quarantined line. Without --yes it only says how many it would "
                                   "delete.",
                       epilog=_ex("dcmon spool export --quarantine -o refused.lp", "dcmon spool quarantine clear --yes"))
    qc.add_argument("--yes", action="store_true", help="really delete")
    qc.set_defaults(func=cmd_quarantine_clear)


def _open(args: argparse.Namespace) -> Spool | None:
    """The configured spool, or None when it does not exist yet."""
    cfg = config_mod.load(args.config)
    path = cfg.resolve(cfg.spool.path)
    try:
        return Spool.open(path, max_bytes=cfg.spool.max_bytes, max_age_s=cfg.spool.max_age_days * 86400,
                          durability=cfg.spool.durability, repair=False, create=False)
    except FileNotFoundError:
        print(f"no spool yet at {path} (`dcmon run` creates it)", file=sys.stderr)
        return None
    except SpoolError:
        owner = _not_mine(path.parent)
        if owner:  # SQLite needs to write beside the file (WAL), even to read it
            words = " ".join(a for a in sys.argv[1:] if a not in ("--config", "-c", args.config)) or "spool status"
            raise DcmonError(f"the spool {path} belongs to {owner}, and this user may not write beside it; run "
                             f"it as that user: sudo -u {owner} dcmon {words}") from None
        raise


def _not_mine(folder: Path) -> str:
    """The owner's name when this user may not write in ``folder`` (the spool's), else ""."""
    import pwd

    try:
        st = folder.stat()
    except OSError:
        return ""
    if os.access(folder, os.W_OK | os.X_OK):
        return ""
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return "dcmon"


def _when(ns: int | None) -> str:
    if ns is None:
        return "-"
    t = datetime.fromtimestamp(ns / 1e9, timezone.utc)
    return f"{t:%Y-%m-%d %H:%M:%S} UTC ({_age(time.time() - ns / 1e9)} ago)"


def _age(s: float) -> str:
    s = max(0.0, s)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def cmd_status(args: argparse.Namespace) -> int:
    sp = _open(args)
    if sp is None:
        return 0
    with sp:
        st = sp.stats()
        depth = sp.count()
    others = _output_spools(args)
    if args.json:
        print(json.dumps({"path": str(sp.path), "depth": depth, "bytes": st.bytes, "file_bytes": st.file_bytes,
                          "max_bytes": sp.max_bytes, "oldest_time_ns": st.oldest_time_ns,
                          "dropped_total": st.dropped_total, "quarantined": st.quarantined,
                          "last_error": st.last_error, "durability": sp.durability, "outputs": others}))
        return 0
    print(f"spool        {sp.path} ({sp.durability} durability)")
    print(f"queued       {depth} reading(s), oldest {_when(st.oldest_time_ns)}")
    print(f"size         {_mib(st.bytes)} used of {_mib(sp.max_bytes)}, {_mib(st.file_bytes)} on disk; "
          f"readings older than {_age(sp.max_age_s)} are dropped")
    print(f"dropped      {st.dropped_total} (the oldest go first when the spool is full)")
    print(f"quarantined  {st.quarantined}" + ("  (dcmon spool quarantine list)" if st.quarantined else ""))
    print(f"last error   {st.last_error or '-'}")
    for name, o in others.items():
        oldest = o.get("oldest_time_ns")
        print(f"{name + ' spool':<12} {o['path']}: " + (f"{o['depth']} queued, oldest {_when(oldest if isinstance(oldest, int) else None)}, "
              f"{o['dropped_total']} dropped" if o.get("exists") else "none yet"))
    return 0


def _output_spools(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The other durable outputs' own spools (the MQTT stream's, beside spool.path), InfluxDB's being above."""
    cfg = config_mod.load(args.config)
    out: dict[str, dict[str, object]] = {}
    if cfg.mqtt.enabled and cfg.mqtt.stream:
        path = cfg.mqtt_spool_path()
        entry: dict[str, object] = {"path": str(path), "exists": path.exists()}
        if path.exists():
            with Spool.open(path, max_bytes=cfg.spool.max_bytes, max_age_s=cfg.spool.max_age_days * 86400,
                            durability=cfg.spool.durability, repair=False, create=False) as other:
                ost = other.stats()
                entry.update(depth=other.count(), oldest_time_ns=ost.oldest_time_ns,
                             dropped_total=ost.dropped_total + ost.lost_total, last_error=ost.last_error)
        out["mqtt"] = entry
    return out


def cmd_export(args: argparse.Namespace) -> int:
    sp = _open(args)
    if sp is None:
        return 0
    n = 0
    out: TextIO
    with sp, contextlib.ExitStack() as stack:
        if args.output:
            try:
                out = stack.enter_context(Path(args.output).open("w", encoding="utf-8"))
            except OSError as e:
                raise DcmonError(f"cannot write {args.output}: {e.strerror}; pick another file with -o") from None
        else:
            out = sys.stdout
        for line in sp.iter_lines(quarantine=args.quarantine):
            out.write(line + "\n")
            n += 1
    if args.output:
        what = "quarantined" if args.quarantine else "queued"
        print(f"exported {n} {what} line(s) to {args.output}", file=sys.stderr)
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    sp = _open(args)
    if sp is None:
        return 0
    with sp:
        total = sp.stats().quarantined
        rows = sp.quarantine_list(None if args.limit <= 0 else args.limit)
    if not rows:
        print("the quarantine is empty")
        return 0
    for q in rows:
        print(f"#{q.id}  set aside {_when(q.at_ns)}\n  why:  {q.reason}\n  line: {q.line}")
    if total > len(rows):
        print(f"... {total - len(rows)} more (--limit 0 shows all; `dcmon spool export --quarantine` writes them out)")
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    sp = _open(args)
    if sp is None:
        return 0
    with sp:
        n = sp.quarantine_retry()
    print(f"{n} line(s) put back in the queue; a running `dcmon run` sends them within seconds"
          + (" (any still refused come back to the quarantine)" if n else ""))
    return 0


def cmd_quarantine_clear(args: argparse.Namespace) -> int:
    sp = _open(args)
    if sp is None:
        return 0
    with sp:
        if not args.yes:
            n = sp.stats().quarantined
            print(f"this deletes {n} quarantined line(s) for good; save them first with "
                  f"`dcmon spool export --quarantine -o FILE`, then run again with --yes", file=sys.stderr)
            return 2
        n = sp.quarantine_clear()
    print(f"deleted {n} quarantined line(s)")
    return 0
