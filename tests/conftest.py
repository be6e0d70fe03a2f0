"""Shared test setup.

Under CI (``CI=true``) a skipped test fails, with the skip's reason: there a skip means something the
tests need (the FHIR example corpus, a service) is missing, and a green run would hide it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    if _in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {_skip_reason(report)}"
    return report


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The published FHIR R4 examples beside the repository (``../shared/corpus``)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
    if not path.is_dir():
        pytest.skip(f"the FHIR example corpus is missing: {path}")
    return path


# -- the service ---------------------------------------------------------------------------------
POSTGRES_ADMIN_URL = os.environ.get("CASEBRIDGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _postgres_url() -> str:
    """A fresh, empty PostgreSQL database for this test session; started if the server is down."""
    import subprocess
    import uuid

    from sqlalchemy import create_engine, text

    def connect():
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return engine

    try:
        engine = connect()
    except Exception:  # noqa: BLE001 - down: try to start it once
        subprocess.run(POSTGRES_START, shell=True, capture_output=True, timeout=60)
        try:
            engine = connect()
        except Exception as error:  # noqa: BLE001
            pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {type(error).__name__}")
    name = f"casebridge_test_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Each test that takes it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'casebridge.db'}"
    return _postgres_url()


@pytest.fixture
def app(tmp_path):
    """The app on a fresh SQLite database."""
    from service import create_app

    return create_app({"database_url": f"sqlite:///{tmp_path / 'casebridge.db'}", "base_url": "http://testserver",
                       "home": tmp_path})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_key(app):
    """make_key(scopes, organization) → headers carrying a new API key."""
    from service import auth

    def make(scopes=("cases:read", "cases:write", "fhir:read", "fhir:write"), organization="org-1") -> dict:
        key = auth.create_key(app.extensions["casebridge"].store, organization, list(scopes))
        return {"Authorization": f"Bearer {key}"}

    return make


REDIS_START = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
               "--dir /var/lib/redis --logfile /var/log/redis/ci.log")


def redis_database(url: str):
    """A flushed Redis database for a test's broker; Redis is started if it is down, and the test is
    skipped (a failure under CI) only when it cannot be had."""
    import subprocess
    import time

    try:
        import redis
    except ImportError:
        pytest.skip("the redis client is not installed")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception:  # noqa: BLE001 - down: start it once
        subprocess.run(REDIS_START, shell=True, capture_output=True, timeout=30)
        time.sleep(0.5)
        try:
            client.ping()
        except Exception as error:  # noqa: BLE001
            pytest.skip(f"Redis is not reachable at {url}: {error}")
    client.flushdb()
    return client
