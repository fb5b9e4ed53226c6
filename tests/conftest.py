"""Shared fixtures: real servers on loopback (see servers.py) and the simulator on a real pty."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import Influxd, VictoriaMetrics  # noqa: E402

from dcmon.simulator import Simulator, meters_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def influxd(tmp_path_factory):
    """One influxd for the session. Tests use their own database names (``fresh_db``)."""
    srv = Influxd(tmp_path_factory.mktemp("influxd")).start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_db(influxd, request):
    """A database of its own for one test: created before, dropped after."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    influxd.drop_db(name)
    influxd.create_db(name)
    yield name
    influxd.drop_db(name)


@pytest.fixture
def own_influxd(tmp_path):
    """An influxd that the test may stop and start (outage tests)."""
    srv = Influxd(tmp_path / "influxd").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def victoria(tmp_path_factory):
    srv = VictoriaMetrics(tmp_path_factory.mktemp("vm")).start()
    yield srv
    srv.stop()


@pytest.fixture
def sim():
    """Two PZEM-017 meters at addresses 1 and 2 on a real pseudo-terminal."""
    with Simulator(meters_for([("pzem017", 1), ("pzem017", 2)])) as s:
        yield s
