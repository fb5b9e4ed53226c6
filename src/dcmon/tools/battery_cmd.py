"""``dcmon battery sync NAME``: tell a battery monitor that the battery is full now.

Victron's monitors have the same setting ("Synchronise SoC to 100 %"): after installing, or after a full
charge the charged-detection did not see (a charger that stops before the tail current is reached), the
user knows the battery is full. The state lives in ``battery.sqlite``, which the running service owns and
rewrites every 30 s, so the command refuses while the service runs (one line: stop it, sync, start it).
Otherwise it restores the saved state (its history is kept), synchronises it to 100 % and forgets the
meters' counter baselines (what flowed before now is not counted against the new 100 %), and saves it: the
service starts from there. Run as root, the file keeps the owner of its folder (the service's user).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .. import config as config_mod
from ..battery import BatteryMonitor
from ..battery_store import BatteryStore, store_path
from ..errors import DcmonError
from .battery_watch import pick_battery, service_record
from .target import note


def cmd_sync(args: argparse.Namespace) -> int:
    from ..service import status_path

    cfg = config_mod.load(args.config)
    bat = pick_battery(cfg, args.name, how="its name: dcmon battery sync NAME")
    if not bat.can_count:
        raise DcmonError(f"battery {bat.name}: its state of charge cannot be estimated with these meters (see "
                         f"docs/battery.md, \"What the meters must measure\"), so there is nothing to synchronise")
    try:
        rec, _why = service_record(status_path(cfg))
    except DcmonError:
        rec = None   # the status is not ours to read: the state file's permissions will tell
    if rec is not None:
        raise DcmonError(f"the service is running (pid {rec.get('pid')}) and keeps the battery state itself: stop "
                         f"it (sudo systemctl stop dcmon), run `dcmon battery sync {bat.name}` again, then start it "
                         f"(sudo systemctl start dcmon)")
    path = store_path(cfg)
    folder = path.parent
    now = time.time_ns()
    store = BatteryStore.open(path)   # BatteryStoreError (one line) when the folder is not writable
    try:
        saved = store.load(bat.name)
        mon = BatteryMonitor.restore(bat, saved, now)
        was = "unknown" if not mon.soc_known else f"{mon.snapshot().soc_pct:.1f} %"
        mon.synchronise_by_hand(now)
        if not store.save({bat.name: mon.to_state(now)}):
            raise DcmonError(f"cannot write the battery state {path} (see the line above): nothing changed")
    finally:
        store.close()
    _keep_owner(folder, path)
    note(f"battery {bat.name}: synchronised to 100 % by hand (was {was}); history kept "
         f"({mon.h.syncs} synchronisation(s)); the service starts from it at its next start")
    return 0


def _keep_owner(folder: Path, path: Path) -> None:
    """Run as root: the state file (and any WAL left beside it) belongs to the folder's owner, the service's
    user, who must go on writing it."""
    if os.geteuid() != 0:
        return
    st = folder.stat()
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            os.chown(p, st.st_uid, st.st_gid)
        except FileNotFoundError:
            continue


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from ..helptext import Formatter, examples
    from .target import handler

    p = sub.add_parser("battery", parents=[common], formatter_class=Formatter,
                       help="battery monitors: synchronise one to 100 %% by hand",
                       description="Commands for the [[batteries]] monitors (docs/battery.md). Their state is "
                                   "shown by `dcmon status` and `dcmon watch --battery NAME`.",
                       epilog=examples("dcmon battery sync house"))
    bsub = p.add_subparsers(dest="battery_command", metavar="SUBCOMMAND")
    bsub.required = True
    s = bsub.add_parser("sync", parents=[common], formatter_class=Formatter,
                        help="the battery is full now: set its state of charge to 100 %%",
                        description="Tell the monitor that the battery is full now (Victron's \"Synchronise SoC "
                                    "to 100 %%\"): after installing, or after a full charge it did not detect. The "
                                    "history is kept. The service must be stopped (it keeps the state itself); "
                                    "the service starts from the synchronised state.",
                        epilog=examples("dcmon battery sync house      # between systemctl stop dcmon and start",
                                        "dcmon battery sync house --config config.toml"))
    s.add_argument("name", nargs="?", metavar="NAME", help="the battery (default: the only one configured)")
    s.set_defaults(func=handler(cmd_sync))


__all__ = ["add_commands", "cmd_sync"]
