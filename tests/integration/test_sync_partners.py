"""The sync engine against a real FHIR server (Medplum's router behind tests/fhir_server/server.mjs),
configured as a full read/write server and as the Epic and Oracle rules; the registry, dead letters,
conflicts and notifications through the JSON API; and real brokers (Redis and the embedded SQLite one)
with real worker processes sharing the work.

Pushes here run the Celery task in the test process (``apply``: eager), so each test sees exactly
which requests a push made; the broker tests at the end start ``python -m service.worker``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import redis_database
import requests

from fhir_server.fixtures import fhir_server
from mappings.export import case_resources
from service import auth as keys
from service import partners as registry
from service import schemas, sync, tasks
from service.sync_store import ledger, sync_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "fixtures" / "cases"
ORG = "org-1"
MRN = "https://stbrigid.example.org/fhir/sid/mrn|00118204"

full = fhir_server("full")
epic = fhir_server("epic", session_ttl=1)
oracle = fhir_server("oracle")
secured = fhir_server("full", token_ttl=1, require_token="never-issued")


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def app(tmp_path, monkeypatch):
    """casebridge on a fresh SQLite database; Celery tasks run in this process (eager)."""
    from service import create_app

    monkeypatch.setenv("CASEBRIDGE_HOME", str(tmp_path))
    app = create_app({"database_url": f"sqlite:///{tmp_path / 'casebridge.db'}", "base_url": "http://testserver",
                      "home": tmp_path})
    app.extensions["celery"].conf.update(task_always_eager=True, task_eager_propagates=True)
    return app


@pytest.fixture
def store(app):
    return app.extensions["casebridge"].store


@pytest.fixture
def api(app):
    client = app.test_client()
    key = keys.create_key(app.extensions["casebridge"].store, ORG,
                          ["admin", "cases:read", "cases:write", "fhir:read", "fhir:write"])
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def add_partner(store, server, partner_id="p1", kind="ehr", profile=None, **fields):
    registry.save_partner(store, {"id": partner_id, "name": f"Partner {partner_id}", "kind": kind,
                                  "base_url": server.base_url, "organizations": [ORG],
                                  "profile": profile or server.partner_profile, **fields})
    return registry.check_capabilities(store, partner_id)


def case_json(name="discharge.json", **changes):
    data = json.loads((CASES / name).read_text())
    data["organization"] = {"id": ORG, "name": "Lakeshore Care Coordination"}
    data.update(changes)
    return data


def save(store, data):
    return store.add_case(ORG, schemas.dump_case(schemas.load_case(data)))


def edit(store, case_id, change):
    stored = store.get_case(ORG, case_id)
    data = copy.deepcopy(stored.data)
    change(data)
    return store.update_case(ORG, case_id, stored.version, schemas.dump_case(schemas.load_case(data)))


def push(store, case_id, partner_id="p1"):
    """The push task, run here; returns the partner's request stats it caused (via the caller's server)."""
    version = store.get_case(ORG, case_id).version
    tasks.push_case.apply(args=(case_id, partner_id, version))


def state(store, case_id, partner_id="p1"):
    with store.engine.connect() as conn:
        return conn.execute(sync_state.select().where(sync_state.c.case_id == case_id,
                                                      sync_state.c.partner_id == partner_id)).first()


def remote_id(store, local_id, partner_id="p1"):
    with store.engine.connect() as conn:
        return conn.execute(ledger.select().where(ledger.c.partner_id == partner_id,
                                                  ledger.c.local_id == local_id)).first().remote_id


def local(case, rtype, index=0):
    """Our id of the case's ``index``-th resource of a type."""
    return [r for r in case_resources(schemas.load_case(case.data)) if r["resourceType"] == rtype][index]["id"]


def at_partner(server, rtype, local_id):
    """Every copy of one of our resources at the partner, found by our sync identifier."""
    bundle = requests.get(f"{server.base_url}/{rtype}", params={"identifier": f"{sync.SYNC_SYSTEM}|{local_id}"},
                          timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", ())]


def read(server, rtype, rid):
    return requests.get(f"{server.base_url}/{rtype}/{rid}", timeout=10).json()


def partner_edit(server, rtype, rid, change):
    """The partner's own user edits its copy (a plain PUT, as the EHR's UI would)."""
    resource = read(server, rtype, rid)
    change(resource)
    reply = requests.put(f"{server.base_url}/{rtype}/{rid}", json=resource, timeout=10,
                         headers={"Content-Type": "application/fhir+json"})
    assert reply.status_code == 200, reply.text
    return reply.json()


def writes(server, before):
    return server.stats()["writes"] - before


def seed_client(server):
    """The client as the EHR knows them: a Patient with their MRN (Epic/Oracle take no Patient from us)."""
    return server.load({"resourceType": "Patient", "id": "ehr-pat-1", "name": [{"family": "Kowalczyk"}],
                        "birthDate": "1946-09-03",
                        "identifier": [{"system": MRN.split("|")[0], "value": MRN.split("|")[1]}]})[0]


# -- full server: the whole plan, then only what changed ------------------------------------------
def references_resolve(server, resources):
    """Each of our resources at the partner refers to the partner's copies of what ours refer to."""
    copies = {(r["resourceType"], r["id"]): at_partner(server, r["resourceType"], r["id"]) for r in resources}
    for resource in resources:
        (theirs,) = copies[(resource["resourceType"], resource["id"])]
        for field in ("subject", "focus", "for"):
            target = (resource.get(field) or {}).get("reference", "")
            if tuple(target.split("/", 1)) in copies:
                (copy_,) = copies[tuple(target.split("/", 1))]
                assert theirs[field]["reference"] == f"{copy_['resourceType']}/{copy_['id']}", (resource, field)
        for goal in resource.get("goal", ()):
            (copy_,) = copies[tuple(goal["reference"].split("/", 1))]
            assert {"reference": f"Goal/{copy_['id']}"} in theirs["goal"]


def test_full_server_gets_the_whole_plan_once_and_an_update_writes_only_what_changed(store, full):
    route = add_partner(store, full)
    assert route["mode"] == "full plan" and route["write_method"] == "transaction"
    assert route["max_bundle_entries"] == 8  # Medplum: a transaction with conditional creates holds 8 at most
    stored = save(store, case_json())
    resources = case_resources(schemas.load_case(stored.data))
    push(store, stored.id)
    assert state(store, stored.id).status == "synced"
    assert len(resources) == 19 and writes(full, 0) == 3  # transactions of 8, 8 and 3
    assert full.stats()["statuses"].get("400", 0) == 0
    for resource in resources:  # each of ours exactly once, findable by our sync identifier
        assert len(at_partner(full, resource["resourceType"], resource["id"])) == 1
    references_resolve(full, resources)

    push(store, stored.id)  # nothing new: nothing written
    assert writes(full, 0) == 3

    goal_id = local(stored, "Goal")
    stored = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself every morning"))
    before = full.stats()
    push(store, stored.id)
    assert full.stats()["writes"] - before["writes"] == 1  # the Goal and the CarePlan, one transaction
    goal = at_partner(full, "Goal", goal_id)[0]
    assert goal["description"]["text"] == "Weighs himself every morning"
    assert goal["meta"]["versionId"] != "1"
    assert state(store, stored.id).synced_version == stored.version


def test_a_transaction_the_server_refuses_whole_is_written_one_request_at_a_time(store, full):
    """Registered as a full server without Medplum's cap, the case's 19 entries with If-None-Exist are
    refused whole (400): nothing was written, so each goes in a request of its own."""
    route = add_partner(store, full, profile="full")
    assert route["write_method"] == "transaction" and route["max_bundle_entries"] is None
    stored = save(store, case_json())
    resources = case_resources(schemas.load_case(stored.data))
    push(store, stored.id)
    assert state(store, stored.id).status == "synced"
    assert full.stats()["statuses"].get("400") == 1 and writes(full, 0) == 19
    for resource in resources:
        assert len(at_partner(full, resource["resourceType"], resource["id"])) == 1
    references_resolve(full, resources)


@pytest.mark.parametrize("profile", ["full", "oracle"])
def test_a_lost_bundle_answer_then_the_retry_leaves_one_copy_of_each(store, request, profile):
    server = request.getfixturevalue(profile)
    add_partner(store, server)
    if profile == "oracle":
        seed_client(server)
    stored = save(store, case_json())
    resources = [r for r in case_resources(schemas.load_case(stored.data))
                 if profile == "full" or r["resourceType"] in ("ServiceRequest", "Task")]
    server.control(fault_drop=1.0)  # the first bundle is applied, and its answer lost
    with pytest.raises(sync.AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", stored.version, registry.endpoint_for(store, "p1"))
    server.control(fault_drop=0.0)
    assert server.stats()["drops"] == 1
    sync.push_case(store, stored.id, "p1", stored.version, registry.endpoint_for(store, "p1"))  # the retry

    assert state(store, stored.id).status == "synced"
    for resource in resources:
        assert len(at_partner(server, resource["resourceType"], resource["id"])) == 1
    references_resolve(server, resources)


# -- conflicts -------------------------------------------------------------------------------------
def test_a_partner_edit_of_an_element_we_do_not_send_is_kept(store, full):
    add_partner(store, full)
    stored = save(store, case_json())
    push(store, stored.id)
    goal_rid = remote_id(store, local(stored, "Goal"))
    partner_edit(full, "Goal", goal_rid, lambda g: g.update(statusDate="2024-05-20"))

    stored = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself daily"))
    push(store, stored.id)  # If-Match with the version we wrote → 412 → merged → written

    goal = read(full, "Goal", goal_rid)
    assert goal["statusDate"] == "2024-05-20"  # theirs, kept
    assert goal["description"]["text"] == "Weighs himself daily"  # ours
    assert state(store, stored.id).status == "synced"


def test_both_sides_editing_the_same_element_is_a_conflict_and_nothing_is_overwritten(store, full, api):
    add_partner(store, full)
    stored = save(store, case_json())
    push(store, stored.id)
    goal_rid = remote_id(store, local(stored, "Goal"))
    partner_edit(full, "Goal", goal_rid, lambda g: g["description"].update(text="Their wording"))
    theirs = read(full, "Goal", goal_rid)

    stored = edit(store, stored.id, lambda d: d["goals"][0].update(description="Our wording"))
    push(store, stored.id)

    assert state(store, stored.id).status == "conflict"
    assert read(full, "Goal", goal_rid) == theirs  # not overwritten
    listed = api.get(f"/conflicts?case={stored.id}").get_json()["items"]
    assert [(c["resource_type"], c["fields"]) for c in listed] == [("Goal", ["description"])]
    assert listed[0]["theirs"]["description"]["text"] == "Their wording"
    assert listed[0]["ours"]["description"]["text"] == "Our wording"
    sync_status = api.get(f"/cases/{stored.id}/sync").get_json()
    assert sync_status["partners"][0]["status"] == "conflict"


# -- Epic and Oracle: referral only, the client already there -------------------------------------
@pytest.mark.parametrize("profile", ["epic", "oracle"])
def test_epic_and_oracle_get_the_referral_only_for_the_client_they_know(store, request, profile):
    server = request.getfixturevalue(profile)
    route = add_partner(store, server, profile=profile)
    assert route["mode"] == "referral only" and route["writable"] == ["ServiceRequest", "Task"]
    patient = seed_client(server)
    stored = save(store, case_json())
    push(store, stored.id)

    assert state(store, stored.id).status == "synced"
    case = schemas.load_case(stored.data)
    requests_ = [r for r in case_resources(case) if r["resourceType"] == "ServiceRequest"]
    if profile == "oracle":  # a batch of the ServiceRequests, then one of the referral's Task
        assert route["write_method"] == "batch" and writes(server, 0) == 2
    else:  # one request each: the ServiceRequests and the referral's Task
        assert route["write_method"] == "single" and writes(server, 0) == len(requests_) + 1
    for rtype in ("CarePlan", "Goal", "Condition", "CareTeam", "Organization", "Practitioner"):
        assert requests.get(f"{server.base_url}/{rtype}", timeout=10).json().get("total", 0) == 0
    assert requests.get(f"{server.base_url}/Patient", timeout=10).json()["total"] == 1  # theirs, no copy of ours
    for resource in requests_:
        (found,) = at_partner(server, "ServiceRequest", resource["id"])
        assert found["subject"]["reference"] == f"Patient/{patient['id']}"
    (task,) = at_partner(server, "Task", local(stored, "Task"))
    assert task["for"]["reference"] == f"Patient/{patient['id']}"
    assert task["status"] == "accepted"

    # an update: only the Task changes, sent with If-Match
    stored = edit(store, stored.id, lambda d: d["services"][0].update(status="in_progress"))
    before = server.stats()["writes"]
    push(store, stored.id)
    assert writes(server, before) == 1
    (task,) = at_partner(server, "Task", local(stored, "Task"))
    assert task["status"] == "in-progress" and task["meta"]["versionId"] != "1"


def test_oracle_answers_a_stale_if_match_409_and_it_is_merged_like_412(store, oracle):
    add_partner(store, oracle, profile="oracle")
    seed_client(oracle)
    stored = save(store, case_json())
    push(store, stored.id)
    task_rid = remote_id(store, local(stored, "Task"))
    partner_edit(oracle, "Task", task_rid, lambda t: t.update(lastModified="2024-05-20T09:00:00Z"))
    statuses = dict(oracle.stats()["statuses"])

    stored = edit(store, stored.id, lambda d: d["services"][0].update(status="completed"))
    push(store, stored.id)

    assert oracle.stats()["statuses"].get("409", 0) == statuses.get("409", 0) + 1  # the stale If-Match
    task = read(oracle, "Task", task_rid)
    assert task["status"] == "completed" and task["lastModified"] == "2024-05-20T09:00:00Z"
    assert state(store, stored.id).status == "synced"


# -- pull ---------------------------------------------------------------------------------------------
def load_tasks(server, n, start=0):
    """Another department's Tasks at the partner, loaded in chunks (a seed transaction is capped)."""
    tasks_ = [{"resourceType": "Task", "id": f"other-{i}", "status": "requested", "intent": "order",
             "description": f"another department's task {i}"} for i in range(start, start + n)]
    for i in range(0, n, 50):
        server.load(*tasks_[i:i + 50])


def test_pull_follows_every_page_from_the_watermark_on_epic(store, epic):
    add_partner(store, epic, profile="epic")
    seed_client(epic)
    stored = save(store, case_json())
    push(store, stored.id)
    load_tasks(epic, 160)  # Epic pages hold at most 100: this takes several pages
    task_rid = remote_id(store, local(stored, "Task"))
    partner_edit(epic, "Task", task_rid, lambda t: t.update(status="completed"))

    result = sync.pull_partner(store, "p1", registry.endpoint_for(store, "p1"))
    assert result.seen >= 161 + 4  # every Task (ours and the 160 others) and our ServiceRequests
    assert result.applied == 1
    case = schemas.load_case(store.get_case(ORG, stored.id).data)
    assert case.service("s-homehealth").status == "completed"  # the closed loop
    first_watermark = result.watermark
    assert first_watermark

    time.sleep(0.01)
    load_tasks(epic, 3, start=500)
    again = sync.pull_partner(store, "p1", registry.endpoint_for(store, "p1"))
    assert again.seen == 3 and again.applied == 0  # only what changed since the watermark
    assert again.watermark > first_watermark


def test_an_expired_search_session_is_started_over_once_and_nothing_is_yielded_twice(store, epic):
    add_partner(store, epic, profile="epic")
    load_tasks(epic, 150)
    endpoint = registry.endpoint_for(store, "p1")
    found = endpoint.search("Task", {"_count": "100"})
    first = [next(found) for _ in range(100)]  # the first page
    time.sleep(1.5)  # past the server's session TTL (1 s): the next link now answers 410
    status_before = epic.stats()["statuses"].get("410", 0)
    rest = list(found)
    assert epic.stats()["statuses"].get("410", 0) == status_before + 1
    ids = [r["id"] for r in first + rest]
    assert len(ids) == len(set(ids)) == 150


def test_a_subscription_notification_pulls_just_what_it_names(store, epic, api):
    add_partner(store, epic, profile="epic")
    seed_client(epic)
    stored = save(store, case_json())
    push(store, stored.id)
    task_rid = remote_id(store, local(stored, "Task"))
    partner_edit(epic, "Task", task_rid, lambda t: t.update(status="completed"))
    load_tasks(epic, 5)
    requests_before = epic.stats()["requests"]
    notification = {  # R4 Backport id-only: a SubscriptionStatus, then the focus as a fullUrl only
        "resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": "urn:uuid:9b1c2f3e-0000-4000-8000-000000000001",
             "resource": {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
                          "notificationEvent": [{"eventNumber": "1", "focus": {"reference": f"Task/{task_rid}"}}]},
             "request": {"method": "GET", "url": "Subscription/referrals/$status"},
             "response": {"status": "200"}},
            {"fullUrl": f"{epic.base_url}/Task/{task_rid}", "request": {"method": "PUT", "url": f"Task/{task_rid}"},
             "response": {"status": "200"}}]}
    reply = api.post("/partners/p1/notify", json=notification)
    assert reply.status_code == 202, reply.get_json()
    assert reply.get_json()["resources"] == [f"Task/{task_rid}"]
    assert epic.stats()["requests"] - requests_before == 1  # one read, no search
    case = schemas.load_case(store.get_case(ORG, stored.id).data)
    assert case.service("s-homehealth").status == "completed"


# -- payers: $member-match first --------------------------------------------------------------------
def test_payer_member_match_422_leaves_the_case_unmatched_and_200_lets_it_through(store, full, api):
    add_partner(store, full, partner_id="plan", kind="payer", high_risk_only=True)
    high = save(store, case_json("insurer_high_risk.json"))
    low = save(store, case_json("discharge.json"))  # moderate risk: never shared with this payer
    assert state(store, low.id, "plan") is None

    push(store, high.id, "plan")
    assert full.stats()["writes"] == 0  # nothing sent
    assert full.stats()["statuses"].get("422") == 1
    status = api.get(f"/cases/{high.id}/sync").get_json()["partners"]
    assert [(p["partner"], p["status"]) for p in status] == [("plan", "unmatched")]
    assert "member" in status[0]["last_error"]

    member = full.load({"resourceType": "Patient", "id": "member-1", "name": [{"family": "Okafor"}],
                        "birthDate": "1978-01-22", "identifier": [
                            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                  "code": "MB"}]},
                             "system": "https://lakeshorehealthplan.example.com/fhir/sid/member-id",
                             "value": "LCH4471829-01"}]})[0]
    push(store, high.id, "plan")
    assert state(store, high.id, "plan").status == "synced"
    assert state(store, high.id, "plan").member_id.endswith("|LCH4471829-01")
    (plan,) = at_partner(full, "CarePlan", local(high, "CarePlan"))
    assert plan["subject"]["reference"] == f"Patient/{member['id']}"  # the payer's member, not a copy
    assert requests.get(f"{full.base_url}/Patient", timeout=10).json()["total"] == 1


# -- dead letters ----------------------------------------------------------------------------------------
def test_a_permanent_error_becomes_a_dead_letter_listed_and_replayed(store, epic, api):
    add_partner(store, epic, profile="epic")
    stored = save(store, case_json())
    push(store, stored.id)  # the client is not at the partner: 422, no retry

    assert state(store, stored.id).status == "failed"
    (letter,) = api.get("/dead-letters?partner=p1").get_json()["items"]
    assert letter["case"] == stored.id and letter["status"] == 422 and letter["operation"] == "push"
    assert api.get("/partners/p1/status").get_json()["dead_letters"] == 1
    assert epic.stats()["writes"] == 0

    seed_client(epic)  # the EHR registers the client; the case manager replays
    reply = api.post(f"/dead-letters/{letter['id']}/replay")
    assert reply.status_code == 202
    assert state(store, stored.id).status == "synced"
    assert api.get("/partners/p1/status").get_json()["dead_letters"] == 0
    assert len(at_partner(epic, "Task", local(stored, "Task"))) == 1


# -- auth -------------------------------------------------------------------------------------------------
def test_an_expired_token_is_refreshed_once_and_the_request_repeated(store, secured):
    add_partner(store, secured, auth={"type": "client_credentials", "token_url": secured.token_url,
                                      "client_id": "casebridge", "client_secret": "s3cret"})
    endpoint = registry.endpoint_for(store, "p1")
    assert requests.get(f"{secured.base_url}/Patient", timeout=10).status_code == 401  # no token, no entry
    list(endpoint.search("Patient"))  # gets a token (lifetime 1 s)
    frozen = endpoint.auth.clock()
    endpoint.auth.clock = lambda: frozen  # our clock lags the server's: we think the token still good
    time.sleep(1.2)
    unauthorized = secured.stats()["unauthorized"]
    list(endpoint.search("Patient"))  # 401 "token expired" → one refresh → the same request again
    assert secured.stats()["unauthorized"] == unauthorized + 1

    stored = save(store, case_json("minimal.json"))  # and a push through a task, with its own endpoint
    push(store, stored.id)
    assert state(store, stored.id).status == "synced"


# -- real brokers and workers ---------------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/11"


def _redis_or_skip():
    return redis_database(REDIS_URL)


def start_worker(home, env, *, beat=False, concurrency=2, pool="threads", log=None):
    argv = [sys.executable, "-m", "service.worker", "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", "INFO" if log else "WARNING"]
    if beat:
        argv.append("--beat")
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def stop(worker):
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def wait_synced(store, partner_id, n, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            rows = conn.execute(sync_state.select().where(sync_state.c.partner_id == partner_id)).all()
        if len(rows) >= n and all(r.status == "synced" and r.synced_version >= r.wanted_version for r in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"not synced within {timeout}s: {[(r.case_id, r.status) for r in rows]}")


def _worker_env(tmp_path, broker_url):
    return {"CASEBRIDGE_HOME": str(tmp_path), "CASEBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'casebridge.db'}",
            "CASEBRIDGE_BROKER_URL": broker_url}


@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_several_workers_share_the_work_with_no_double_sends(tmp_path, monkeypatch, full, broker):
    from service import create_app

    if broker == "redis":
        _redis_or_skip()
        broker_url = REDIS_URL
    else:
        broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    env = _worker_env(tmp_path, broker_url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = create_app()
    store = app.extensions["casebridge"].store
    add_partner(store, full)
    stored = [save(store, case_json("minimal.json", id=f"case-{i}", client={"id": f"cl-{i}"}))
              for i in range(12)]
    for case in stored[:6]:
        edit(store, case.id, lambda d: d.update(title="second version"))
    # several workers: with Redis, two processes (one with the dispatch schedule) of two threads each;
    # the embedded broker is one machine's queue: one process, four threads
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]
    workers = [start_worker(tmp_path, env, beat=True, concurrency=4 if broker == "sqlite" else 2, log=logs[0])]
    if broker == "redis":
        workers.append(start_worker(tmp_path, env, concurrency=2, log=logs[1]))
    try:
        rows = wait_synced(store, "p1", len(stored), timeout=60)
    finally:
        for worker in workers:
            stop(worker)
        for log in logs:
            log.close()
    assert len(rows) == len(stored)
    done = [(tmp_path / f"worker-{i}.log").read_text().count("casebridge.push_case") for i in range(len(workers))]
    assert all(n > 0 for n in done), f"push tasks seen per worker: {done}"  # both took a share
    ours = set()  # (type, id) of every resource of ours; cases of one organization share its Organization
    for case in stored:
        current = store.get_case(ORG, case.id)
        for resource in case_resources(schemas.load_case(current.data)):
            ours.add((resource["resourceType"], resource["id"]))
        (plan,) = at_partner(full, "CarePlan", local(current, "CarePlan"))
        if current.version == 2:
            assert plan.get("title") == "second version"
    for rtype, local_id in ours:
        found = at_partner(full, rtype, local_id)
        assert len(found) == 1, (rtype, local_id, len(found))
    # one transaction a push: each case's first, plus the six CarePlan updates at most
    assert len(stored) <= full.stats()["writes"] <= len(stored) + 6
