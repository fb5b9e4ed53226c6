"""A full card (issue 19, item 2): the spool on a real, tiny filesystem (a tmpfs this test mounts; it needs
root, as the suite has here and in CI, and is skipped with the reason otherwise). InfluxDB is down (no
sender): the spool must keep the newest readings, drop the oldest, and count the drops exactly, WAL and all.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from dcmon.clock import Clock
from dcmon.reading import encode_line
from dcmon.spool import Spool

KiB, MiB = 1024, 1024 * 1024
FS_SIZE = 6 * MiB


@pytest.fixture
def card(tmp_path):
    """A 6 MiB tmpfs: the whole 'SD card' the spool lives on."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the suite runs as root in CI)")
    mnt = tmp_path / "card"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def cycle(seq0: int, t0: int) -> list[str]:
    """8 meters' readings, each ~300 bytes, each carrying its sequence number."""
    return [encode_line("dc_power", {"sensor": f"m{i}", "pad": "x" * 200}, {"voltage_v": 12.5, "seq": seq0 + i},
                        t0 + (seq0 + i) * 1000) for i in range(8)]


def open_card_spool(card: Path, **kw) -> Spool:
    clock = Clock(synced=lambda: True)  # the real wall clock, said to be synchronised
    return Spool.open(card / "spool.sqlite", max_bytes=256 * MiB, max_age_s=365 * 86400, clock=clock,
                      disk_reserve=kw.pop("disk_reserve", 512 * KiB), **kw)


def queued_seqs(sp: Spool) -> list[int]:
    return [int(line.split("seq=")[1].split("i")[0].split(" ")[0].rstrip("i")) for line in sp.iter_lines()]


def check_exact(sp: Spool, total: int) -> list[int]:
    """Nothing lost, every drop counted, and what is left is exactly the newest readings, in order."""
    st = sp.stats()
    seqs = queued_seqs(sp)
    assert st.lost_total == 0, st
    assert len(seqs) == sp.count() == st.depth
    assert st.dropped_total + len(seqs) == total, (st.dropped_total, len(seqs), total)
    assert seqs == list(range(total - len(seqs), total)), "the newest readings must be the ones kept"
    return seqs


def fill(path: Path) -> int:
    """Write a file until the filesystem is full (ENOSPC), as another program would. Returns its size."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * (64 * KiB)
        while True:
            try:
                n += f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
        small = b"\0" * 512
        while True:
            try:
                n += f.write(small)
            except OSError:
                return n


def test_small_card_keeps_newest_and_counts_drops_exactly(card):
    """~6 MiB of readings into a 6 MiB card: the spool stops at what the card can spare (database + WAL +
    reserve file within the card, the disk reserve left free) and from then on drops the oldest."""
    sp = open_card_spool(card)
    t0 = time.time_ns()
    total = 0
    for c in range(2500):  # 20,000 readings, ~6 MB of line protocol
        sp.put(cycle(total, t0))
        total += 8
    seqs = check_exact(sp, total)
    st = sp.stats()
    assert st.dropped_total > 0
    assert len(seqs) > 3000, f"only {len(seqs)} readings kept: the card has room for more"
    on_card = sum(p.stat().st_size for p in card.iterdir())
    free = os.statvfs(card).f_bavail * os.statvfs(card).f_frsize
    assert free >= 256 * KiB, f"the spool filled the card: {free} bytes free, {on_card} used"
    assert (card / "spool.sqlite-reserve").exists(), "the reserve file is kept while the card has room"
    sp.close()
    # reopened, as after a restart: the same readings, the same counts
    sp = open_card_spool(card)
    assert check_exact(sp, total) == seqs
    sp.close()


def test_card_filled_by_another_program_still_keeps_newest(card):
    """Another program fills the card to the last byte (ENOSPC). SQLite then needs disk space even to
    delete; the spool's reserve file gives it that: the oldest readings are dropped, the newest kept, every
    drop counted, none lost."""
    sp = open_card_spool(card, disk_reserve=0)
    t0 = time.time_ns()
    total = 0
    for _ in range(300):
        sp.put(cycle(total, t0))
        total += 8
    filler = card / "other-program.log"
    fill(filler)
    assert os.statvfs(card).f_bavail == 0
    for _ in range(3000):  # 24,000 more readings into a card with no free block
        sp.put(cycle(total, t0))
        total += 8
    seqs = check_exact(sp, total)
    assert len(seqs) > 500 and sp.stats().dropped_total > 0
    assert not (card / "spool.sqlite-reserve").exists(), "the reserve was used"
    # the other program frees its space: the reserve comes back at the next periodic check
    filler.unlink()
    sp._next_check = 0.0  # (the check runs once a minute; not waiting for it here)
    sp.put(cycle(total, t0))
    total += 8
    assert (card / "spool.sqlite-reserve").exists()
    check_exact(sp, total)
    sp.close()
