"""Nothing lost, nothing doubled: real workers on Redis push many updates to the real FHIR server while it
answers 503 to 30% of requests and drops the answer after committing 10% of writes, and one worker is
killed with SIGKILL mid-run. After the faults stop and the retries finish, each of our resources is at
the partner exactly once with the latest version's content, and every case is synced at its latest
version.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import redis_database
import requests

from fhir_server.fixtures import fhir_server
from mappings.export import case_resources
from service import partners as registry
from service import schemas, sync
from service.sync_store import dead_letters, sync_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ORG = "org-1"
REDIS_URL = "redis://127.0.0.1:6379/12"
CASES = 40
UPDATES = 3  # each case: created, then updated three times (four versions)

full = fhir_server("full")


def redis_db():
    return redis_database(REDIS_URL)


def start_worker(env, log, *, beat=False):
    return subprocess.Popen(
        [sys.executable, "-m", "service.worker", "--pool", "threads", "--concurrency", "3", "--loglevel", "INFO",
         *(["--beat"] if beat else [])],
        cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)


def stop(worker):
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def case_json(i):
    return {"id": f"fault-{i:03d}", "program": "other", "status": "active", "title": f"case {i} v1",
            "organization": {"id": ORG}, "client": {"id": f"client-{i:03d}", "names": [{"family": f"Family{i}"}]}}


def update(store, case_id, n):
    stored = store.get_case(ORG, case_id)
    data = copy.deepcopy(stored.data)
    data["title"] = f"{data['title'].rsplit(' v', 1)[0]} v{n}"
    data["client"]["names"] = [{"family": f"{data['client']['names'][0]['family'].rstrip('0123456789')}{n}"}]
    return store.update_case(ORG, case_id, stored.version, schemas.dump_case(schemas.load_case(data)))


def test_faults_and_a_killed_worker_lose_and_double_nothing(tmp_path, monkeypatch, full):
    from service import create_app

    redis_db()
    env = {"CASEBRIDGE_HOME": str(tmp_path), "CASEBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'casebridge.db'}",
           "CASEBRIDGE_BROKER_URL": REDIS_URL,
           "CASEBRIDGE_RETRY_BASE": "0.2", "CASEBRIDGE_RETRY_CAP": "2",  # short backoff for the test
           "CASEBRIDGE_BROKER_VISIBILITY_TIMEOUT": "10"}  # a dead worker's tasks come back after 10 s
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app()
    store = app.extensions["casebridge"].store
    registry.save_partner(store, {"id": "p1", "name": "Mercy", "kind": "ehr", "base_url": full.base_url,
                                  "organizations": [ORG], "profile": full.partner_profile})
    registry.check_capabilities(store, "p1")
    full.control(fault_503=0.3, fault_drop=0.1, seed=7)

    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(3)]
    workers = [start_worker(env, logs[0], beat=True), start_worker(env, logs[1])]
    started = time.monotonic()
    killed_at = None
    try:
        ids = [store.add_case(ORG, schemas.dump_case(schemas.load_case(case_json(i)))).id for i in range(CASES)]
        for n in range(2, UPDATES + 2):  # the updates come in rounds while the workers push
            time.sleep(2.5)
            for case_id in ids:
                update(store, case_id, n)
            if n == 3:  # mid-run: the second worker dies without warning, holding whatever it had taken
                workers[1].send_signal(signal.SIGKILL)
                workers[1].wait()
                killed_at = time.monotonic() - started
                workers.append(start_worker(env, logs[2]))  # and a replacement comes up
        time.sleep(5)
        faults = full.stats()
        full.control(fault_503=0, fault_drop=0)  # the partner recovers; retries finish the work
        rows = _wait_all_synced(store, len(ids), timeout=120)
        elapsed = time.monotonic() - started
    finally:
        for worker in workers:
            stop(worker)
        for log in logs:
            log.close()

    stats = full.stats()
    print(f"\nfault run: {CASES} cases x {UPDATES + 1} versions = {CASES * (UPDATES + 1)} case versions; "
          f"{faults['fault503']} answers 503, {faults['drops']} answers dropped after commit, 1 worker killed "
          f"at {killed_at:.1f}s; all synced after {elapsed:.1f}s; partner saw {stats['requests']} requests, "
          f"{stats['writes']} writes")
    assert faults["fault503"] > 0 and faults["drops"] > 0  # the faults did happen
    assert all(r.status == "synced" and r.synced_version == UPDATES + 1 == r.wanted_version for r in rows)
    with store.engine.connect() as conn:
        assert conn.execute(dead_letters.select()).all() == []

    # each of our resources exactly once at the partner, with the latest version's content
    ours = {}
    for case_id in ids:
        stored = store.get_case(ORG, case_id)
        assert stored.version == UPDATES + 1
        for resource in case_resources(schemas.load_case(stored.data)):
            ours[(resource["resourceType"], resource["id"])] = resource
    session = requests.Session()
    for (rtype, local_id), resource in ours.items():
        bundle = session.get(f"{full.base_url}/{rtype}", params={"identifier": f"{sync.SYNC_SYSTEM}|{local_id}"},
                             timeout=10).json()
        found = [e["resource"] for e in bundle.get("entry", ())]
        assert len(found) == 1, (rtype, local_id, len(found))
        if rtype == "CarePlan":
            assert found[0]["title"] == resource["title"] and found[0]["title"].endswith(f" v{UPDATES + 1}")
        if rtype == "Patient":
            assert found[0]["name"] == resource["name"]
    per_type = {t: sum(1 for (rt, _) in ours if rt == t) for t in {t for t, _ in ours}}
    for rtype, n in per_type.items():  # and nothing else of ours there
        total = session.get(f"{full.base_url}/{rtype}", params={"_count": "0", "_total": "accurate"},
                            timeout=10).json().get("total")
        assert total == n, (rtype, total, n)


def _wait_all_synced(store, n, timeout):
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            rows = conn.execute(sync_state.select().where(sync_state.c.partner_id == "p1")).all()
        if len(rows) == n and all(r.status == "synced" and r.synced_version >= r.wanted_version for r in rows):
            return rows
        time.sleep(1)
    states = {}
    for r in rows:
        states[(r.status, r.synced_version, r.wanted_version)] = states.get((r.status, r.synced_version,
                                                                             r.wanted_version), 0) + 1
    raise AssertionError(f"not all synced within {timeout}s: {states}")
