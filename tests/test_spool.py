"""The spool on its own (real SQLite files in a temp folder): order, caps, quarantine, corruption, durability."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dcmon.reading import encode_line
from dcmon.spool import Spool, SpoolError, line_time_ns

MiB = 1024 * 1024
T0 = time.time_ns()


def lines(n: int, start: int = 0, t0: int | None = None, pad: int = 0) -> list[str]:
    t0 = time.time_ns() if t0 is None else t0
    tags = {"sensor": "s1", "bus": "b1"} | ({"pad": "x" * pad} if pad else {})
    return [encode_line("dc_power", tags, {"voltage_v": 12.0 + (start + i) % 1000 / 1000, "seq": start + i}, t0 + start + i)
            for i in range(n)]


def open_spool(tmp_path: Path, **kw) -> Spool:
    kw.setdefault("max_bytes", 64 * MiB)
    kw.setdefault("max_age_s", 365 * 86400)
    return Spool.open(tmp_path / "var" / "spool.sqlite", **kw)


def test_put_peek_ack_keeps_order_and_timestamps(tmp_path):
    sp = open_spool(tmp_path)
    batch = lines(10)
    sp.put(batch[:4])
    sp.put(batch[4:])
    rows = sp.peek(6)
    assert [line for _, line in rows] == batch[:6]
    sp.ack([rid for rid, _ in rows[:3]])
    assert [line for _, line in sp.peek(100)] == batch[3:]
    st = sp.stats()
    assert st.depth == 7
    assert st.oldest_time_ns == line_time_ns(batch[3])
    sp.close()
    # reopened: same content (the queue is on disk)
    sp = open_spool(tmp_path)
    assert [line for _, line in sp.peek(100)] == batch[3:]
    assert sp.stats().depth == 7
    sp.close()


def test_line_without_timestamp_gets_one_and_newlines_split(tmp_path):
    sp = open_spool(tmp_path)
    before = time.time_ns()
    sp.put(["m v=1", "m v=2 123\nm v=3 124\n", "   "])
    got = [line for _, line in sp.peek(10)]
    assert got[1:] == ["m v=2 123", "m v=3 124"]
    head, ts = got[0].rsplit(" ", 1)
    assert head == "m v=1" and int(ts) >= before  # replays of it overwrite, never duplicate
    sp.close()


def test_size_cap_drops_oldest_counts_and_warns(tmp_path, caplog):
    sp = open_spool(tmp_path, max_bytes=MiB)
    caplog.set_level(logging.WARNING, logger="dcmon.spool")
    n = 0
    for _ in range(600):  # ~8 × 300 bytes per put: about 1.4 MiB in all
        sp.put(lines(8, start=n, t0=T0, pad=200))
        n += 8
    st = sp.stats()
    assert st.bytes <= MiB
    assert st.dropped_total > 0
    assert st.depth + st.dropped_total == n
    kept = sp.peek(10**6)
    assert kept[-1][1] == lines(1, start=n - 1, t0=T0, pad=200)[0]  # the newest is kept
    assert kept[0][1] == lines(1, start=st.dropped_total, t0=T0, pad=200)[0]  # exactly the oldest went
    warnings = [r.getMessage() for r in caplog.records if "dropped the" in r.getMessage()]
    assert len(warnings) == 1 and "oldest readings" in warnings[0]  # one line, saying how many
    sp.close()
    sp = open_spool(tmp_path, max_bytes=MiB)
    assert sp.stats().dropped_total == st.dropped_total  # persisted
    sp.close()


def test_age_cap_drops_expired(tmp_path):
    sp = open_spool(tmp_path, max_age_s=3600)
    old = time.time_ns() - 2 * 3600 * 10**9
    sp.put(lines(5, t0=old))
    sp.put(lines(3))  # the age check runs on put
    st = sp.stats()
    assert st.depth == 3 and st.dropped_total == 5
    assert all(line_time_ns(line) > old + 10 for _, line in sp.peek(10))
    sp.close()


def test_quarantine_list_retry_clear(tmp_path):
    sp = open_spool(tmp_path)
    batch = lines(5)
    sp.put(batch)
    rows = sp.peek(5)
    assert sp.quarantine([rows[1][0], rows[3][0]], "400: bad") == 2
    assert [line for _, line in sp.peek(10)] == [batch[0], batch[2], batch[4]]
    q = sp.quarantine_list()
    assert [x.line for x in q] == [batch[1], batch[3]] and q[0].reason == "400: bad"
    assert list(sp.iter_lines(quarantine=True)) == [batch[1], batch[3]]
    assert sp.stats().quarantined == 2
    assert sp.quarantine_retry() == 2
    assert sp.stats().quarantined == 0
    assert [line for _, line in sp.peek(10)] == [batch[0], batch[2], batch[4], batch[1], batch[3]]
    sp.quarantine([sp.peek(1)[0][0]], "x")
    assert sp.quarantine_clear() == 1 and sp.stats().quarantined == 0
    sp.close()


def test_corrupt_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "var" / "spool.sqlite"
    path.parent.mkdir()
    path.write_bytes(b"this is not an sqlite file at all" * 100)
    with pytest.raises(SpoolError, match="unusable"):  # the `dcmon spool` command does not repair
        Spool.open(path, max_bytes=MiB, max_age_s=86400, repair=False)
    assert path.read_bytes().startswith(b"this is not")
    caplog.set_level(logging.WARNING, logger="dcmon.spool")
    sp = Spool.open(path, max_bytes=MiB, max_age_s=86400)
    aside = list(path.parent.glob("spool.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert sp.moved_aside == aside[0]
    msg = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert len(msg) == 1 and str(aside[0]) in msg[0] and ".recover" in msg[0]
    sp.put(lines(3))
    assert sp.stats().depth == 3
    sp.close()


def test_corruption_found_later_is_moved_aside(tmp_path):
    """Damage inside the file (a bad SD card) shows up on a read, not at open: same treatment."""
    path = tmp_path / "spool.sqlite"
    sp = Spool.open(path, max_bytes=64 * MiB, max_age_s=86400)
    for i in range(50):
        sp.put(lines(20, start=i * 20, pad=100))
    sp.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[2 * 4096:len(data)] = b"\xa5" * (len(data) - 2 * 4096)  # every page but the header and schema
    path.write_bytes(bytes(data))
    sp = Spool.open(path, max_bytes=64 * MiB, max_age_s=86400)
    sp.peek(5000)
    fresh = lines(2, start=10**6)
    sp.put(fresh)
    assert [line for _, line in sp.peek(10)] == fresh  # a new, working spool
    assert sp.stats().depth == 2
    assert list(tmp_path.glob("spool.sqlite.corrupt-*"))
    sp.close()


def test_foreign_database_is_left_alone(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(SpoolError, match="not a dcmon spool"):
        Spool.open(path, max_bytes=MiB, max_age_s=86400)
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_unusable_folder_names_path_and_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError) as e:
        Spool.open(blocker / "spool.sqlite", max_bytes=MiB, max_age_s=86400)
    assert str(blocker) in str(e.value) and "spool.path" in str(e.value)


@pytest.mark.parametrize(("durability", "synchronous"), [("process", 1), ("power", 2)])
def test_durability_pragmas(tmp_path, durability, synchronous):
    sp = open_spool(tmp_path, durability=durability)
    assert sp.pragma("journal_mode") == "wal"
    assert sp.pragma("synchronous") == synchronous  # 1 = NORMAL, 2 = FULL
    sp.close()


def test_full_disk_loses_readings_without_raising(tmp_path, caplog):
    """SQLite's max_page_count gives a real SQLITE_FULL, as a full SD card would."""
    sp = open_spool(tmp_path)
    sp.put(lines(1))
    caplog.set_level(logging.INFO, logger="dcmon.spool")
    pages = sp.pragma("page_count")
    sp.pragma(f"max_page_count={pages}")
    for i in range(40):
        sp.put(lines(50, start=100 + i * 50, pad=200))  # must not raise
    st = sp.stats()
    assert st.lost_total > 0 and "disk is full" in st.last_error
    assert len([r for r in caplog.records if "cannot store" in r.getMessage()]) == 1
    sp.pragma("max_page_count=1000000")
    sp.put(lines(1, start=10**6))
    assert any("writable again" in r.getMessage() for r in caplog.records)
    sp.close()


def test_threads_put_while_draining(tmp_path):
    sp = open_spool(tmp_path)
    done = threading.Event()
    got: list[str] = []

    def writer(k: int) -> None:
        for i in range(100):
            sp.put(lines(8, start=k * 10_000 + i * 8))

    def drainer() -> None:
        while not done.is_set() or sp.peek(1):
            rows = sp.peek(37)
            got.extend(line for _, line in rows)
            sp.ack([rid for rid, _ in rows])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    d = threading.Thread(target=drainer)
    d.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    d.join(timeout=30)
    assert len(got) == len(set(got)) == 4 * 100 * 8
    assert sp.stats().depth == 0
    sp.close()


def test_corruption_while_open_is_moved_aside(tmp_path, caplog):
    """The file goes bad under a running spool: the next operation moves it aside and carries on."""
    path = tmp_path / "spool.sqlite"
    sp = Spool.open(path, max_bytes=64 * MiB, max_age_s=86400)
    for i in range(50):
        sp.put(lines(20, start=i * 20, pad=100))
    sp.pragma("wal_checkpoint(TRUNCATE)")
    sp.pragma("cache_size=1")  # so pages are read from the file again
    caplog.set_level(logging.WARNING, logger="dcmon.spool")
    with path.open("r+b") as f:
        f.seek(2 * 4096)
        f.write(b"\xa5" * (path.stat().st_size - 2 * 4096))
    assert sp.peek(5000) == []  # the damaged queue is gone from view, the spool is new and empty
    fresh = lines(2, start=10**6)
    sp.put(fresh)
    assert [line for _, line in sp.peek(10)] == fresh
    assert len(list(tmp_path.glob("spool.sqlite.corrupt-*"))) == 1
    assert any("moved it to" in r.getMessage() for r in caplog.records)
    sp.close()


def test_deferred_ack_rides_on_next_put(tmp_path):
    """The sender's acks are committed with the next put (one commit per cycle instead of two). Until
    then the rows are still on disk: a crash re-sends them, which InfluxDB absorbs (same timestamps)."""
    path = tmp_path / "spool.sqlite"
    sp = Spool.open(path, max_bytes=64 * MiB, max_age_s=86400)
    first, second = lines(8, start=0), lines(8, start=8)
    sp.put(first)
    sp.ack([rid for rid, _ in sp.peek(100)], defer=True)
    assert sp.peek(100) == [] and sp.stats().depth == 0 and sp.stats().oldest_time_ns is None

    def on_disk() -> list[str]:
        other = sqlite3.connect(path)
        try:
            return [r[0] for r in other.execute("SELECT line FROM queue ORDER BY id")]
        finally:
            other.close()

    assert on_disk() == first  # not deleted yet: a crash now would send these again
    commits: list[str] = []
    sp._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    sp.put(second)
    assert len(commits) == 1  # the delete and the insert in one transaction
    assert on_disk() == second and [x for _, x in sp.peek(100)] == second and sp.stats().depth == 8
    sp.ack([rid for rid, _ in sp.peek(100)], defer=True)
    sp.flush_acks(older_than_s=3600)  # too young: stays deferred
    assert on_disk() == second
    sp.flush_acks()
    assert on_disk() == []
    sp.put(first)
    sp.ack([rid for rid, _ in sp.peek(100)], defer=True)
    sp.close()  # close commits deferred acks
    assert on_disk() == []


def test_spool_command(tmp_path, capsys):
    """`dcmon spool` status / export / quarantine on a real spool file named by a real config file."""
    from dcmon.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text('[spool]\npath = "var/spool.sqlite"\n')
    assert main(["--config", str(cfg), "spool"]) == 0
    assert "no spool yet" in capsys.readouterr().err
    sp = Spool.open(tmp_path / "var" / "spool.sqlite", max_bytes=64 * MiB, max_age_s=86400)
    batch = lines(4)
    sp.put(batch)
    sp.quarantine([sp.peek(1)[0][0]], "InfluxDB at x rejected the data (400): bad")
    sp.set_last_error("InfluxDB at http://127.0.0.1:8086: connection refused (is InfluxDB running?)")
    sp.close()

    assert main(["--config", str(cfg), "spool", "status"]) == 0
    out = capsys.readouterr().out
    assert "queued       3 reading(s)" in out and "quarantined  1" in out and "connection refused" in out
    assert main(["--config", str(cfg), "spool", "export", "-o", str(tmp_path / "q.lp")]) == 0
    assert (tmp_path / "q.lp").read_text().splitlines() == batch[1:]
    assert main(["--config", str(cfg), "spool", "export", "--quarantine"]) == 0
    assert capsys.readouterr().out.splitlines() == batch[:1]
    assert main(["--config", str(cfg), "spool", "quarantine", "list"]) == 0
    assert "rejected the data (400)" in capsys.readouterr().out
    assert main(["--config", str(cfg), "spool", "quarantine", "clear"]) == 2  # needs --yes
    assert "export --quarantine" in capsys.readouterr().err
    assert main(["--config", str(cfg), "spool", "quarantine", "retry"]) == 0
    assert main(["--config", str(cfg), "spool", "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert data["depth"] == 4 and data["quarantined"] == 0


def test_nearly_full_disk_stops_growth(tmp_path, caplog):
    """The real free space of the test's disk, with the reserve set so that only ~2 MiB are left: the
    spool stops growing there and drops the oldest, instead of filling the disk."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    caplog.set_level(logging.WARNING, logger="dcmon.spool")
    sp = open_spool(tmp_path, max_bytes=1 << 40, disk_reserve=free - 2 * MiB)
    for i in range(1500):  # ~4 MiB of lines
        sp.put(lines(8, start=i * 8, t0=T0, pad=250))
    st = sp.stats()
    assert st.dropped_total > 0 and st.bytes <= 3 * MiB
    assert any("disk nearly full" in r.getMessage() for r in caplog.records)
    sp.close()
