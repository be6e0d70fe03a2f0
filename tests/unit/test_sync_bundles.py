"""Pushes written as Bundles, against in-memory partners: a transaction for a partner that has one, a
batch in rounds for one with batch only (Oracle-like), with the guarantees of one request at a time
kept: exactly once after a lost answer, If-Match with merge or a recorded conflict, dead letters."""
from __future__ import annotations

import copy
import json
import re

import pytest
from test_sync import ORG, add_partner, case_json, count, edit, save, state, store  # noqa: F401 - store: fixture

from adapters import profiles
from adapters.errors import AmbiguousWrite, NotSupported, PermanentError, TransientError, make_outcome
from adapters.memory import MemoryEndpoint
from mappings.export import case_resources
from service import partners as registry, schemas, sync, sync_bundles
from service.sync_store import conflicts, dead_letters, ledger

WRITES = {"create", "update", "transaction", "batch"}
MRN = {"system": "https://stbrigid.example.org/fhir/sid/mrn", "value": "00118204"}  # the discharge client's


class Recording(MemoryEndpoint):
    """A partner that keeps a copy of every Bundle it is sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bundles: list[dict] = []

    def transaction(self, bundle):
        self.bundles.append(copy.deepcopy(bundle))
        return super().transaction(bundle)

    def batch(self, bundle):
        self.bundles.append(copy.deepcopy(bundle))
        return super().batch(bundle)


class Refusing(Recording):
    """A batch partner that refuses each entry for one resource type with ``status``."""

    def __init__(self, *args, refuse: str, status: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse, self.status = refuse, status

    def _entry(self, entry):
        if (entry.get("resource") or {}).get("resourceType") == self.refuse:
            raise PermanentError(f"{self.refuse} refused", status=self.status,
                                 outcome=make_outcome("processing", f"{self.refuse}.owner is not known here"))
        return super()._entry(entry)


class LosesFirstAnswer(Recording):
    """A partner that applies the first create of one resource type and loses its answer."""

    def __init__(self, *args, rtype: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.rtype, self.lost = rtype, False

    def create(self, resource, if_none_exist=None):
        written = super().create(resource, if_none_exist)
        if resource["resourceType"] == self.rtype and not self.lost:
            self.lost = True
            raise AmbiguousWrite("the answer was lost")
        return written


def writes(endpoint, since=0):
    return [call for call in endpoint.calls[since:] if call[0] in WRITES]


def resources_of(stored):
    return case_resources(schemas.load_case(stored.data))


def remote(endpoint, rtype, local_id):
    """Every copy of one of our resources at the partner, by our sync identifier."""
    return [r for r in endpoint.all(rtype)
            if {"system": sync.SYNC_SYSTEM, "value": local_id} in r.get("identifier", ())]


def exactly_once(endpoint, stored, types=None):
    for resource in resources_of(stored):
        if types is None or resource["resourceType"] in types:
            assert len(remote(endpoint, resource["resourceType"], resource["id"])) == 1, resource["resourceType"]


def ledger_of(store, local_id):
    with store.engine.connect() as conn:
        return conn.execute(ledger.select().where(ledger.c.local_id == local_id)).first()


def oracle_with_client(cls=Recording, quirks=None, **kwargs):
    """An Oracle-like partner (batch, no transaction, referral only) that knows the discharge client."""
    endpoint = cls(profiles.capabilities("oracle", **(quirks or {})), **kwargs)
    endpoint.put({"resourceType": "Patient", "id": "ehr-pat", "identifier": [MRN]})
    return endpoint


# -- transaction -----------------------------------------------------------------------------------
def test_a_new_case_goes_in_one_transaction_with_references_between_its_new_resources(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    result = sync.push_case(store, stored.id, "p1", stored.version, endpoint)

    resources = resources_of(stored)
    assert writes(endpoint) == [("transaction", f"{len(resources)} entries")]  # one write request, no lookups
    assert result.written == len(resources) == 19 and state(store, stored.id).status == "synced"
    (sent,) = endpoint.bundles
    assert {e["request"]["method"] for e in sent["entry"]} == {"POST"}
    for entry in sent["entry"]:  # conditional creates, each under its placeholder
        assert entry["fullUrl"].startswith("urn:uuid:")
        local_id = next(i["value"] for i in entry["resource"]["identifier"] if i["system"] == sync.SYNC_SYSTEM)
        assert entry["request"]["ifNoneExist"] == f"identifier={sync.SYNC_SYSTEM}|{local_id}"
    exactly_once(endpoint, stored)

    plan = endpoint.all("CarePlan")[0]
    patient = endpoint.all("Patient")[0]
    assert plan["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert {g["reference"] for g in plan["goal"]} == {f"Goal/{g['id']}" for g in endpoint.all("Goal")}
    for goal in endpoint.all("Goal"):
        assert goal["subject"]["reference"] == f"Patient/{patient['id']}"
    (task,) = endpoint.all("Task")
    assert task["focus"]["reference"] in {f"ServiceRequest/{s['id']}" for s in endpoint.all("ServiceRequest")}
    # the ledger holds what the partner holds: its ids, its versions, and the bodies with its references
    row = ledger_of(store, plan["identifier"][-1]["value"])
    assert (row.remote_id, row.remote_version) == (plan["id"], "1") and row.written_versions == ["1"]
    assert row.sent["goal"] == plan["goal"] and row.sent_hash == sync.body_hash(row.sent)


def test_an_unchanged_case_sends_nothing(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    since = len(endpoint.calls)
    assert sync.push_case(store, stored.id, "p1", stored.version, endpoint).skipped == "already synced"
    sync._update_state(store, stored.id, "p1", status="pending")  # a push repeated after a crash
    again = sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert again.written == 0 and again.unchanged == 19 and writes(endpoint, since) == []


def test_an_update_is_a_transaction_of_puts_with_if_match(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    changed = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself daily"))
    since = len(endpoint.calls)
    result = sync.push_case(store, stored.id, "p1", changed.version, endpoint)

    assert writes(endpoint, since) == [("transaction", "2 entries")] and result.written == 2
    sent = endpoint.bundles[-1]
    assert {e["resource"]["resourceType"] for e in sent["entry"]} == {"Goal", "CarePlan"}
    for entry in sent["entry"]:
        rtype, rid = entry["request"]["url"].split("/")
        assert entry["request"]["method"] == "PUT" and entry["resource"]["id"] == rid
        assert entry["request"]["ifMatch"] == 'W/"1"'
        assert endpoint.get(rtype, rid)["meta"]["versionId"] == "2"
    goal_id = stored.data["goals"][0]["id"]
    (goal,) = [g for g in endpoint.all("Goal") if g["description"]["text"] == "Weighs himself daily"]
    row = ledger_of(store, next(i["value"] for i in goal["identifier"] if i["system"] == sync.SYNC_SYSTEM))
    assert row.remote_version == "2" and row.written_versions == ["1", "2"] and goal_id


def test_a_new_goal_in_an_update_is_referred_to_by_its_placeholder(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    goal = {**stored.data["goals"][0], "id": "g-walks", "description": "Walks to the mailbox", "addresses": []}
    changed = edit(store, stored.id, lambda d: d["goals"].append(goal))
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)

    sent = endpoint.bundles[-1]
    (post,) = [e for e in sent["entry"] if e["request"]["method"] == "POST"]
    plan_entry = next(e for e in sent["entry"] if e["resource"]["resourceType"] == "CarePlan")
    assert {"reference": post["fullUrl"]} in plan_entry["resource"]["goal"]
    (new,) = [g for g in endpoint.all("Goal") if g["description"]["text"] == "Walks to the mailbox"]
    assert {"reference": f"Goal/{new['id']}"} in endpoint.all("CarePlan")[0]["goal"]
    assert count(endpoint, "Goal") == len(stored.data["goals"]) + 1


def _synced_goal(store, endpoint):
    """A case pushed to the partner: (the stored case, its first goal's id, that goal at the partner)."""
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    local = stored.data["goals"][0]["id"]
    theirs = next(g for g in endpoint.all("Goal") if g["description"]["text"].startswith("Weighs himself"))
    return stored, local, theirs


def test_a_stale_if_match_in_the_transaction_falls_back_and_merges(store):
    endpoint = Recording()
    stored, local, theirs = _synced_goal(store, endpoint)
    endpoint.put({**theirs, "note": [{"text": "Discussed at the discharge huddle"}]})  # their edit: version 2
    changed = edit(store, stored.id, lambda d: next(g for g in d["goals"] if g["id"] == local)
                   .update(description="Weighs himself daily"))
    since = len(endpoint.calls)
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)

    methods = [call[0] for call in endpoint.calls[since:]]
    assert methods[0] == "transaction" and "read" in methods  # refused whole (412), then one at a time
    after = endpoint.get("Goal", theirs["id"])
    assert after["description"]["text"] == "Weighs himself daily"
    assert after["note"] == [{"text": "Discussed at the discharge huddle"}]  # theirs, kept
    assert state(store, stored.id).status == "synced"


def test_a_stale_if_match_on_an_element_both_changed_records_a_conflict(store):
    endpoint = Recording()
    stored, local, theirs = _synced_goal(store, endpoint)
    endpoint.put({**theirs, "description": {"text": "Their wording"}})
    changed = edit(store, stored.id, lambda d: next(g for g in d["goals"] if g["id"] == local)
                   .update(description="Our wording"))
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)

    assert endpoint.get("Goal", theirs["id"])["description"] == {"text": "Their wording"}
    assert state(store, stored.id).status == "conflict"
    with store.engine.connect() as conn:
        (conflict,) = conn.execute(conflicts.select()).all()
    assert conflict.fields == ["description"] and conflict.resource_type == "Goal"


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-exist", "looked-for-first"])
def test_a_lost_transaction_answer_then_the_retry_leaves_one_copy_of_each(store, conditional):
    endpoint = Recording(profiles.capabilities("full", conditional_create=conditional))
    add_partner(store, endpoint)
    stored = save(store, case_json())
    endpoint.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert count(endpoint, "CarePlan") == 1  # it was applied
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)  # the task's retry

    exactly_once(endpoint, stored)
    assert state(store, stored.id).status == "synced"
    assert [c[0] for c in writes(endpoint)] == ["transaction", "transaction"]
    retry = endpoint.bundles[-1]["entry"]
    if conditional:  # If-None-Exist found each one: nothing written twice
        assert {e["request"]["method"] for e in retry} == {"POST"}
        assert all(len(endpoint.history(t, r["id"])) == 1 for t in ("Goal", "CarePlan") for r in endpoint.all(t))
    else:  # each found by our identifier first, then brought up to date in place
        assert {e["request"]["method"] for e in retry} == {"PUT"}


def test_after_a_lost_update_answer_the_retry_reads_and_sends_nothing_already_there(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    changed = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself daily"))
    endpoint.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    since = len(endpoint.calls)
    result = sync.push_case(store, stored.id, "p1", changed.version, endpoint)  # the task's retry

    assert [c[0] for c in endpoint.calls[since:]] == ["read", "read"]  # the Goal and the CarePlan: ours, landed
    assert result.written == 0 and state(store, stored.id).status == "synced"
    again = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself every day"))
    since = len(endpoint.calls)
    sync.push_case(store, stored.id, "p1", again.version, endpoint)
    assert endpoint.calls[since:] == [("transaction", "2 entries")]  # the ledger knows the versions now
    assert all(len(endpoint.history(t, r["id"])) <= 3 for t in ("Goal", "CarePlan") for r in endpoint.all(t))


def test_an_update_turned_away_is_sent_again_as_it_was_with_nothing_to_look_up(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    changed = edit(store, stored.id, lambda d: d["goals"][0].update(description="Weighs himself daily"))
    endpoint.fail_next(1, TransientError("busy", status=503), on={"transaction"})
    with pytest.raises(TransientError):
        sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    since = len(endpoint.calls)
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    assert endpoint.calls[since:] == [("transaction", "2 entries")]  # nothing went out before: no reads


def test_a_lost_update_answer_is_ours_when_the_case_has_moved_on_since(store):
    """The transaction adding a goal was applied, its answer lost; the case changed again before the
    retry. The partner's copy is our lost write (with the goal's placeholder resolved), not their edit:
    merged without a conflict."""
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    goal = {**stored.data["goals"][0], "id": "g-walks", "description": "Walks to the mailbox", "addresses": []}
    second = edit(store, stored.id, lambda d: (d["goals"].append(goal), d.update(title="Discharge plan, v2")))
    endpoint.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", second.version, endpoint)
    third = edit(store, stored.id, lambda d: d.update(title="Discharge plan, v3"))
    sync.push_case(store, stored.id, "p1", third.version, endpoint)

    assert state(store, stored.id).status == "synced"
    with store.engine.connect() as conn:
        assert conn.execute(conflicts.select()).all() == []
    (plan,) = endpoint.all("CarePlan")
    assert plan["title"] == "Discharge plan, v3"
    (new,) = [g for g in endpoint.all("Goal") if g["description"]["text"] == "Walks to the mailbox"]
    assert {"reference": f"Goal/{new['id']}"} in plan["goal"]


@pytest.mark.parametrize("method", ["transaction", "single"])
def test_a_copy_found_by_a_retried_create_is_ours_not_the_partners_change(store, method):
    """The create's answer was lost and the case changed before the retry; the retry finds the first
    copy there, and its update is turned away. A pull meanwhile reads that copy: an echo of our own
    lost write, not the partner's change to apply to the case."""
    if method == "transaction":
        endpoint = Recording()
        endpoint.drop_answer_next(1)
    else:
        endpoint = LosesFirstAnswer(profiles.capabilities("full", system_deny=["transaction", "batch"]),
                                    rtype="CarePlan")
    add_partner(store, endpoint)
    stored = save(store, case_json("minimal.json", title="Plan, first version"))
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    changed = edit(store, stored.id, lambda d: d.update(title="Plan, second version"))
    endpoint.fail_next(1, TransientError("busy", status=503), on={"update"})
    with pytest.raises(TransientError):
        sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    assert endpoint.all("CarePlan")[0]["title"] == "Plan, first version"  # still there

    sync.pull_partner(store, "p1", endpoint)
    assert store.get_case(ORG, stored.id).version == changed.version  # nothing taken from the partner
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)
    assert endpoint.all("CarePlan")[0]["title"] == "Plan, second version"
    exactly_once(endpoint, changed)


def test_a_partner_that_turns_the_transaction_away_gets_one_request_at_a_time(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json("minimal.json"))
    endpoint.fail_next(1, NotSupported("transaction is not enabled", status=405), on={"transaction"})
    result = sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert [c[0] for c in writes(endpoint)] == ["transaction"] + ["create"] * len(resources_of(stored))
    assert result.written == len(resources_of(stored)) and state(store, stored.id).status == "synced"
    exactly_once(endpoint, stored)


def test_a_busy_partner_fails_the_transaction_for_a_retry_and_nothing_is_half_written(store):
    endpoint = Recording()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    endpoint.fail_next(1, TransientError("busy", status=503), on={"transaction"})
    with pytest.raises(TransientError):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert count(endpoint, "CarePlan") == 0 and ledger_of(store, stored.data["goals"][0]["id"]) is None
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    exactly_once(endpoint, stored)


def test_a_partner_that_caps_its_bundles_gets_several_transactions_each_after_what_it_refers_to(store):
    endpoint = Recording(profiles.capabilities("medplum"))  # at most 8 entries a transaction
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)

    assert [len(b["entry"]) for b in endpoint.bundles] == [8, 8, 3]
    for sent in endpoint.bundles:  # a placeholder only ever names a resource of the same transaction
        placeholders = {e["fullUrl"] for e in sent["entry"]}
        assert set(re.findall(r"urn:uuid:[0-9a-f-]{36}", json.dumps([e["resource"] for e in sent["entry"]]))) \
            <= placeholders
    exactly_once(endpoint, stored)
    (plan,) = endpoint.all("CarePlan")
    assert {g["reference"] for g in plan["goal"]} == {f"Goal/{g['id']}" for g in endpoint.all("Goal")}
    assert state(store, stored.id).status == "synced"


# -- batch -----------------------------------------------------------------------------------------
def test_a_batch_partner_gets_the_referrals_then_their_task_in_two_rounds(store):
    endpoint = oracle_with_client()
    route = registry.get_partner(store, add_partner(store, endpoint))["route"]
    assert route["write_method"] == "batch" and route["mode"] == "referral only"
    stored = save(store, case_json())
    result = sync.push_case(store, stored.id, "p1", stored.version, endpoint)

    requests_ = [r for r in resources_of(stored) if r["resourceType"] == "ServiceRequest"]
    assert writes(endpoint) == [("batch", f"{len(requests_)} entries"), ("batch", "1 entries")]
    first, second = endpoint.bundles
    assert {e["resource"]["resourceType"] for e in first["entry"]} == {"ServiceRequest"}
    assert [e["resource"]["resourceType"] for e in second["entry"]] == ["Task"]
    for entry in first["entry"] + second["entry"]:  # no If-None-Exist there: looked for first instead
        assert entry["request"] == {"method": "POST", "url": entry["resource"]["resourceType"]}
        assert "urn:uuid:" not in str(entry["resource"])  # a batch entry cannot refer to another
    assert ("search_page", f"ServiceRequest?identifier={sync.SYNC_SYSTEM}|{requests_[0]['id']}") in endpoint.calls
    assert result.written == len(requests_) + 1 and state(store, stored.id).status == "synced"
    exactly_once(endpoint, stored, {"ServiceRequest", "Task"})
    (task,) = endpoint.all("Task")
    focus = remote(endpoint, "ServiceRequest", next(r for r in resources_of(stored)
                                                    if r["resourceType"] == "Task")["focus"]["reference"]
                   .split("/")[1])[0]
    assert task["focus"] == {"reference": f"ServiceRequest/{focus['id']}"}
    assert task["for"] == {"reference": "Patient/ehr-pat"}
    assert count(endpoint, "CarePlan") == 0 and count(endpoint, "Patient") == 1


def test_a_capped_batch_is_sent_in_more_rounds(store):
    endpoint = oracle_with_client(quirks={"max_bundle_entries": 2})
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert [[e["resource"]["resourceType"] for e in b["entry"]] for b in endpoint.bundles] == [
        ["ServiceRequest"] * 2, ["ServiceRequest"] * 2, ["ServiceRequest", "Task"]]
    exactly_once(endpoint, stored, {"ServiceRequest", "Task"})


def test_a_409_entry_in_a_batch_is_merged_one_request_at_a_time(store):
    endpoint = oracle_with_client()
    add_partner(store, endpoint)
    stored = save(store, case_json())
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    (task,) = endpoint.all("Task")
    endpoint.put({**task, "lastModified": "2024-05-20T09:00:00Z"})  # their edit
    changed = edit(store, stored.id, lambda d: d["services"][0].update(status="completed"))
    since = len(endpoint.calls)
    sync.push_case(store, stored.id, "p1", changed.version, endpoint)

    assert [c[0] for c in endpoint.calls[since:]] == ["batch", "update", "read", "update"]
    after = endpoint.get("Task", task["id"])
    assert after["status"] == "completed" and after["lastModified"] == "2024-05-20T09:00:00Z"
    assert state(store, stored.id).status == "synced"


def test_a_422_entry_in_a_batch_is_a_dead_letter_and_what_went_through_is_kept(store):
    endpoint = oracle_with_client(Refusing, refuse="Task", status=422)
    add_partner(store, endpoint)
    stored = save(store, case_json())
    with pytest.raises(PermanentError) as refused:
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert refused.value.status == 422 and not isinstance(refused.value, TransientError)
    assert "Task.owner is not known here" in str(refused.value)
    sync.record_failure(store, "p1", stored.id, stored.version, "push", refused.value)
    with store.engine.connect() as conn:
        (letter,) = conn.execute(dead_letters.select()).all()
    assert letter.status == 422 and letter.outcome["issue"][0]["diagnostics"] == "Task.owner is not known here"
    assert state(store, stored.id).status == "failed"
    assert count(endpoint, "Task") == 0
    exactly_once(endpoint, stored, {"ServiceRequest"})

    endpoint.refuse = None  # the partner fixes its side; the dead letter is replayed
    since = len(endpoint.calls)
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert writes(endpoint, since) == [("batch", "1 entries")]  # only the Task: the rest is in the ledger
    exactly_once(endpoint, stored, {"ServiceRequest", "Task"})


def test_a_503_entry_in_a_batch_is_retried_later(store):
    endpoint = oracle_with_client(Refusing, refuse="Task", status=503)
    add_partner(store, endpoint)
    stored = save(store, case_json())
    with pytest.raises(TransientError) as busy:
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    assert busy.value.status == 503
    endpoint.refuse = None
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)  # the task's retry
    exactly_once(endpoint, stored, {"ServiceRequest", "Task"})
    assert state(store, stored.id).status == "synced"


def test_a_lost_batch_answer_then_the_retry_leaves_one_copy_of_each(store):
    endpoint = oracle_with_client()  # no conditional create: found by our identifier on the retry
    add_partner(store, endpoint)
    stored = save(store, case_json())
    endpoint.drop_answer_next(1)
    with pytest.raises(AmbiguousWrite):
        sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    sync.push_case(store, stored.id, "p1", stored.version, endpoint)
    exactly_once(endpoint, stored, {"ServiceRequest", "Task"})
    assert state(store, stored.id).status == "synced"


# -- the bundles themselves ------------------------------------------------------------------------
def test_placeholders_are_stable_and_answers_are_read_from_location_and_etag():
    assert sync_bundles.placeholder("Goal", "g1") == sync_bundles.placeholder("Goal", "g1")
    assert sync_bundles.placeholder("Goal", "g1") != sync_bundles.placeholder("Goal", "g2")
    writes_ = [sync_bundles.Write("Goal", "g1", {"resourceType": "Goal"}),
               sync_bundles.Write("Task", "t1", {"resourceType": "Task"}, "t-9", if_match='W/"3"')]
    answered = sync_bundles.answers("batch", {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "201 Created", "location": "http://ehr.test/fhir/Goal/g-7/_history/1"}},
        {"response": {"status": "200", "etag": 'W/"4"'}}]}, writes_)
    assert [(a.status, a.remote_id, a.version) for a in answered] == [(201, "g-7", "1"), (200, "t-9", "4")]
    with pytest.raises(PermanentError):
        sync_bundles.answers("batch", {"resourceType": "Bundle", "type": "batch-response", "entry": []}, writes_)
    refused = sync_bundles.answers("batch", {"resourceType": "Bundle", "entry": [
        {"response": {"status": "422 Unprocessable Entity", "outcome": make_outcome("processing", "no")}},
        {"response": {"status": "429"}}]}, writes_)
    assert isinstance(sync_bundles.refused("batch", writes_[0], refused[0]), PermanentError)
    assert isinstance(sync_bundles.refused("batch", writes_[1], refused[1]), TransientError)
