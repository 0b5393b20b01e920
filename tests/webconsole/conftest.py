"""The console's database for its tests: SQLite (the default) and PostgreSQL (`--database postgresql+psycopg://...`),
a throwaway server started for the session (tests/webconsole/postgres.py). Where no PostgreSQL is installed the
PostgreSQL cases skip, saying so; MEDFUSION_REQUIRE_POSTGRES=1 (set by .ci/run) makes that a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from medfusion_fl.webconsole import app as app_module
from tests.webconsole.postgres import binaries, fresh_database, scratch_server


@pytest.fixture(scope="session")
def postgres_base() -> Iterator[str | None]:
    """The base URL of a scratch PostgreSQL server for this session, or None where there is none."""
    bin_dir = binaries()
    if bin_dir is None:
        if os.environ.get("MEDFUSION_REQUIRE_POSTGRES"):
            pytest.fail("MEDFUSION_REQUIRE_POSTGRES is set but PostgreSQL is not installed: apt-get install postgresql")
        yield None
        return
    with scratch_server(bin_dir) as base:
        yield base


@pytest.fixture(params=["sqlite", "postgresql"])
def console_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                     postgres_base: str | None) -> str:
    """Which database the console of a test uses: the runs folder's SQLite file, or a fresh PostgreSQL database
    (what default_database returns, for the console and for the test's own sessions)."""
    if request.param == "sqlite":
        return "sqlite"
    if postgres_base is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql); .ci/run installs it")
    url = fresh_database(postgres_base)
    monkeypatch.setattr(app_module, "default_database", lambda runs_dir: url)
    monkeypatch.setattr(request.module, "default_database", lambda runs_dir: url, raising=False)
    return url
