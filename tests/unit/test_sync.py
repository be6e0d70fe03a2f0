"""The sync engine against in-memory partners (fakes of the port): push exactly once in effect,
capability-aware routes, conflicts, payers, pull and the closed loop."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from adapters import profiles
from adapters.errors import AmbiguousWrite, PermanentError
from adapters.memory import MemoryEndpoint
from service import migrations, partners as registry, schemas, sync
from service.store import Store, now
from service.sync_store import conflicts, dead_letters, outbox, sync_state

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
ORG = "org-1"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBRIDGE_HOME", str(tmp_path))
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrations.upgrade(store)
    store.add_save_hook(sync.on_case_saved)
    return store


def add_partner(store, endpoint, **fields) -> str:
    data = {"id": "p1", "name": "Mercy General", "kind": "ehr", "base_url": "http://partner.test/fhir",
            "organizations": [ORG], **fields}
    registry.save_partner(store, data)
    registry.check_capabilities(store, data["id"], endpoint)
    return data["id"]


def case_json(name: str = "discharge.json", **changes) -> dict:
    data = json.loads((CASES / name).read_text())
    data["organization"] = {"id": ORG, "name": "Lakeshore Care Coordination"}
    data.update(changes)
    return data


def save(store, data):
    return store.add_case(ORG, schemas.dump_case(schemas.load_case(data)))


def edit(store, case_id, change):
    stored = store.get_case(ORG, case_id)
    data = json.loads(json.dumps(stored.data))
    change(data)
    return store.update_case(ORG, case_id, stored.version, schemas.dump_case(schemas.load_case(data)))


def state(store, case_id, partner_id="p1"):
    with store.engine.connect() as conn:
        return conn.execute(sync_state.select().where(sync_state.c.case_id == case_id,
                                                      sync_state.c.partner_id == partner_id)).first()


def count(endpoint, rtype):
    return len(endpoint.all(rtype))


def test_a_case_save_writes_an_outbox_row_and_dispatch_enqueues_it_once(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    edit(store, stored.id, lambda d: d.update(title="Discharge plan, revised"))
    enqueued = []
    assert sync.dispatch(store, lambda *args: enqueued.append(args)) == 1
    assert enqueued == [("p1", [(stored.id, 2)])]  # two versions waiting: one push of the newest
    assert sync.dispatch(store, lambda *args: enqueued.append(args)) == 0
    assert state(store, stored.id).status == "pending"


def test_dispatch_drains_the_outbox_in_pages_and_spreads_the_cases_over_tasks(store):
    add_partner(store, MemoryEndpoint())
    stored = [save(store, case_json(id=f"case-{i}", client={"id": f"client-{i}"})) for i in range(45)]
    enqueued = []

    assert sync.dispatch(store, lambda *args: enqueued.append(args), limit=10) == 45  # five pages, one call
    cases = [case_id for _, items in enqueued for case_id, _ in items]
    assert sorted(cases) == sorted(s.id for s in stored)  # each once
    assert all(partner == "p1" for partner, _ in enqueued)
    assert len(enqueued) >= 5  # a page of 10 goes out as several tasks, for several workers


def test_rows_whose_task_the_broker_refused_wait_for_the_next_dispatch(store):
    add_partner(store, MemoryEndpoint())
    stored = [save(store, case_json(id=f"case-{i}", client={"id": f"client-{i}"})) for i in range(16)]
    taken = []

    def broker_goes_down(partner_id, items):
        if taken:
            raise ConnectionError("broker unreachable")
        taken.extend(items)

    with pytest.raises(ConnectionError):
        sync.dispatch(store, broker_goes_down)
    enqueued = []
    assert sync.dispatch(store, lambda partner, items: enqueued.extend(items)) == 16 - len(taken)
    assert sorted(c for c, _ in taken + enqueued) == sorted(s.id for s in stored)  # none lost, none twice


def test_a_case_of_another_organization_or_program_is_not_shared(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint, programs=["care_coordination"])
    save(store, case_json())  # a discharge case
    with store.engine.connect() as conn:
        assert conn.execute(outbox.select()).all() == []


def test_push_writes_the_full_plan_once_and_nothing_when_unchanged(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    first = sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert first.written > 5 and count(endpoint, "CarePlan") == 1 and count(endpoint, "Goal") == len(stored.data["goals"])
    plan = endpoint.all("CarePlan")[0]
    goal_refs = {g["reference"] for g in plan["goal"]}
    assert goal_refs == {f"Goal/{g['id']}" for g in endpoint.all("Goal")}  # references use the partner's ids
    assert state(store, stored.id).status == "synced"
    calls = len(endpoint.calls)
    again = sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert again.written == 0 and len(endpoint.calls) == calls  # already synced: not even a read


def test_only_what_changed_is_written_again(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    changed = edit(store, stored.id, lambda d: d["goals"][0].update(status="achieved", achieved_date="2024-06-01"))
    result = sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    # the goal and the plan (its narrative names goal statuses) change; nothing else is written
    assert result.written == 2, result
    assert any(g["lifecycleStatus"] == "completed" for g in endpoint.all("Goal"))
    assert count(endpoint, "Goal") == len(stored.data["goals"])


def test_a_create_whose_answer_was_lost_is_found_not_repeated(store):
    endpoint = MemoryEndpoint(profiles.capabilities("epic"))  # no conditional create
    endpoint.put({"resourceType": "Patient", "id": "ehr-pat",
                  "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.1234.1", "value": "MRN-000"}]})
    data = case_json()
    data["client"]["identifiers"] = [{"kind": "mrn", "system": "urn:oid:2.16.840.1.113883.3.1234.1",
                                      "value": "MRN-000"}]
    add_partner(store, endpoint)
    stored = save(store, data)
    endpoint.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)  # the retry
    referrals = [s for s in stored.data["services"]]
    assert count(endpoint, "ServiceRequest") == len(referrals)  # exactly one copy each
    assert count(endpoint, "CarePlan") == 0 and count(endpoint, "Goal") == 0  # read-only there


def test_the_route_follows_the_partner(store):
    epic = MemoryEndpoint(profiles.capabilities("epic"))
    add_partner(store, epic)
    assert registry.get_partner(store, "p1")["route"]["mode"] == "referral only"
    oracle = MemoryEndpoint(profiles.capabilities("oracle"))
    registry.check_capabilities(store, "p1", oracle)
    route = registry.get_partner(store, "p1")["route"]
    assert route["mode"] == "referral only" and route["write_method"] == "batch"
    full = MemoryEndpoint()
    registry.check_capabilities(store, "p1", full)
    route = registry.get_partner(store, "p1")["route"]
    assert route["mode"] == "full plan" and route["write_method"] == "transaction"


def test_a_referral_only_partner_without_the_client_is_a_permanent_failure(store):
    endpoint = MemoryEndpoint(profiles.capabilities("epic"))
    add_partner(store, endpoint)
    stored = save(store, case_json())
    with pytest.raises(PermanentError):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    letter = sync.record_failure(store, "p1", stored.id, stored.version, "push",
                                 PermanentError(422, None, "client not at partner"))
    assert letter and state(store, stored.id).status == "failed"
    with store.engine.connect() as conn:
        assert len(conn.execute(dead_letters.select()).all()) == 1


def test_their_change_to_an_element_we_do_not_change_is_kept(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    goal = endpoint.all("Goal")[0]
    endpoint.put({**goal, "note": [{"text": "Discussed at the hospital's discharge huddle"}]})  # their edit
    local = stored.data["goals"][0]["id"]
    changed = edit(store, stored.id, lambda d: next(g for g in d["goals"] if g["id"] == local)
                   .update(description="Walks to the mailbox and back without help"))
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    after = endpoint.get("Goal", goal["id"])
    assert after["description"]["text"] == "Walks to the mailbox and back without help"
    assert after["note"] == [{"text": "Discussed at the hospital's discharge huddle"}]
    assert state(store, stored.id).status == "synced"


def test_both_sides_changing_the_same_element_is_a_conflict_and_nothing_is_overwritten(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    local = stored.data["goals"][0]["id"]
    remote = next(g for g in endpoint.all("Goal") if any(i["value"] == local for i in g["identifier"]))
    endpoint.put({**remote, "description": {"text": "Their wording"}})
    changed = edit(store, stored.id, lambda d: next(g for g in d["goals"] if g["id"] == local)
                   .update(description="Our wording"))
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    assert endpoint.get("Goal", remote["id"])["description"] == {"text": "Their wording"}
    assert state(store, stored.id).status == "conflict"
    with store.engine.connect() as conn:
        (conflict,) = conn.execute(conflicts.select()).all()
    assert conflict.fields == ["description"] and conflict.case_id == stored.id


def test_a_payer_member_is_matched_before_anything_is_sent(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint, kind="payer", high_risk_only=True)
    low = save(store, case_json("discharge.json", id="case-low"))  # moderate risk: not shared
    assert state(store, low.id) is None
    data = case_json("insurer_high_risk.json")
    stored = save(store, data)
    result = sync.push_case(store, stored.id, "p1", stored.version, endpoint)  # no member there yet
    assert result.skipped == "member not matched" and state(store, stored.id).status == "unmatched"
    assert count(endpoint, "CarePlan") == 0
    client = stored.data["client"]
    name = client["names"][0]
    endpoint.put({"resourceType": "Patient", "id": "member-1", "name": [{"family": name["family"],
                                                                        "given": name.get("given", [])}],
                  "birthDate": client["birth_date"], "gender": client.get("gender", "unknown"),
                  "identifier": [{"system": "http://payer.test/member", "value": "M-1"}]})
    result = sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert result.written > 0 and state(store, stored.id).member_id
    assert count(endpoint, "CarePlan") == 1


def test_pull_turns_a_new_referral_into_one_intake_case_and_follows_its_task(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    endpoint.put({"resourceType": "Patient", "id": "pat-9", "name": [{"family": "Okafor", "given": ["Ada"]}],
                  "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-9"}], "gender": "female"})
    endpoint.put({"resourceType": "ServiceRequest", "id": "sr-9", "status": "active", "intent": "order",
                  "code": {"text": "Home-delivered meals after discharge"}, "subject": {"reference": "Patient/pat-9"},
                  "authoredOn": "2024-05-02"})
    endpoint.put({"resourceType": "Task", "id": "task-9", "status": "requested", "intent": "order",
                  "focus": {"reference": "ServiceRequest/sr-9"}, "for": {"reference": "Patient/pat-9"},
                  "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}})
    first = sync.pull_partner(store, "p1", endpoint)
    assert first.new_cases == 1
    again = sync.pull_partner(store, "p1", endpoint)
    assert again.new_cases == 0
    from service.store import cases
    with store.engine.connect() as conn:
        rows = conn.execute(cases.select()).all()
    assert len(rows) == 1 and json.loads(rows[0].data)["status"] == "intake"
    # the partner's side moves the referral on: the case follows
    task = endpoint.get("Task", "task-9")
    endpoint.put({**task, "status": "accepted"})
    sync.pull_partner(store, "p1", endpoint)
    case = store.get_case(ORG, rows[0].id).data
    assert case["services"][0]["status"] == "accepted"


def test_a_subscription_notification_names_what_to_pull():
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "http://ehr.test/fhir/SubscriptionStatus/s1",
         "resource": {"resourceType": "SubscriptionStatus", "notificationEvent": [
             {"eventNumber": "1", "focus": {"reference": "Task/t1"}}]}},
        {"fullUrl": "http://ehr.test/fhir/ServiceRequest/sr1/_history/2"}]}
    assert sync.notified_references(bundle) == ["Task/t1", "ServiceRequest/sr1"]


def test_a_task_leases_its_cases_in_one_write_and_leaves_out_one_another_push_holds(store):
    endpoint = MemoryEndpoint()
    add_partner(store, endpoint)
    free, held = save(store, case_json()), save(store, case_json(id="case-2", client={"id": "client-2"}))
    other = sync.take_leases(store, "p1", [held.id])  # another task's push holds this one

    leases = sync.take_leases(store, "p1", [free.id, held.id])

    assert set(leases) == {free.id} and set(other) == {held.id}
    with pytest.raises(sync.CaseBusy):  # without a lease of its own it waits, as before
        sync.push_case(store, held.id, "p1", held.version, endpoint)
    sync.push_case(store, free.id, "p1", free.version, endpoint, leases[free.id])
    assert (state(store, free.id).status, state(store, free.id).lease) == ("synced", None)  # given back
    # a lease half gone is renewed before the push goes on, not lost to another push meanwhile
    edit(store, free.id, lambda d: d.update(title="Discharge plan, revised"))
    [old] = sync.take_leases(store, "p1", [free.id]).values()
    ageing = sync.Lease(old.token, now() + dt.timedelta(seconds=1))
    result = sync.push_case(store, free.id, "p1", 2, endpoint, ageing)
    assert result.written >= 1 and state(store, free.id).lease is None
