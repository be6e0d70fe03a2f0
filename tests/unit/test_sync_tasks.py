"""The push task's retries, run eagerly in this process (Celery ``apply``): a case another push holds is
waited for apart from the bounded retries a failing partner gets, and neither ends in a lost update.

The partner answers with ``responses``; Celery reports each retry through its ``task_retry`` signal.
"""
from __future__ import annotations

import datetime as dt
import re
from contextlib import contextmanager

import pytest
import responses
from celery.signals import task_retry
from sqlalchemy import select, update

from adapters.memory import MemoryEndpoint
from service import partners as registry, sync_push, tasks
from service.store import now
from service.sync_store import dead_letters, sync_state
from test_sync import ORG, case_json, save

PARTNER_URL = "http://partner.test/fhir"
UNAVAILABLE = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "transient", "diagnostics": "down for maintenance"}]}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """casebridge on a fresh SQLite database with one partner; Celery tasks run in this process, and a
    retry runs there at once (propagating errors would raise Celery's ``Retry`` out of ``apply``)."""
    from service import create_app

    monkeypatch.setenv("CASEBRIDGE_HOME", str(tmp_path))
    app = create_app({"database_url": f"sqlite:///{tmp_path / 'casebridge.db'}", "home": tmp_path})
    app.extensions["celery"].conf.update(task_always_eager=True, task_eager_propagates=False)
    store = app.extensions["casebridge"].store
    registry.save_partner(store, {"id": "p1", "name": "Mercy General", "kind": "ehr", "base_url": PARTNER_URL,
                                  "organizations": [ORG]})
    registry.check_capabilities(store, "p1", MemoryEndpoint())  # its route: what a full FHIR server takes
    return store


@pytest.fixture
def unavailable_partner():
    """The partner answers every request 503."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as partner:
        for method in (responses.GET, responses.POST, responses.PUT):
            partner.add(method, re.compile(re.escape(PARTNER_URL) + ".*"), status=503, json=UNAVAILABLE)
        yield partner


@contextmanager
def retries_seen(after_each=None):
    """The error behind each retry of a task, in order; ``after_each(seen)`` runs after each retry."""
    seen: list[Exception] = []

    def note(sender=None, reason=None, **_):
        seen.append(reason.exc)
        if after_each is not None:
            after_each(seen)

    task_retry.connect(note, weak=False)
    try:
        yield seen
    finally:
        task_retry.disconnect(note)


def leave_lease(store, case_id, until):
    """The push lease as a worker killed mid-push left it."""
    with store.engine.begin() as conn:
        conn.execute(update(sync_state).where(sync_state.c.case_id == case_id, sync_state.c.partner_id == "p1")
                     .values(lease="killed-worker", lease_until=until))


def letters(store):
    with store.engine.connect() as conn:
        return conn.execute(select(dead_letters)).all()


def test_a_push_outwaits_a_dead_workers_lease_and_still_gets_every_transient_retry(store, unavailable_partner):
    stored = save(store, case_json())
    leave_lease(store, stored.id, now() + dt.timedelta(seconds=sync_push.LEASE_SECONDS))
    waits = tasks.MAX_RETRIES + 5  # more than a failing partner may be retried

    def the_lease_runs_out(seen):
        if len(seen) == waits:
            leave_lease(store, stored.id, now() - dt.timedelta(seconds=1))

    with retries_seen(the_lease_runs_out) as seen:
        assert tasks.push_case.apply(args=(stored.id, "p1", stored.version)).successful()

    busy = [e for e in seen if isinstance(e, sync_push.CaseBusy)]
    failures = [e for e in seen if not isinstance(e, sync_push.CaseBusy)]
    assert len(busy) == waits and seen[:waits] == busy
    assert len(failures) == tasks.MAX_RETRIES  # the waiting used none of them
    assert all(e.status == 503 for e in failures)
    assert len(unavailable_partner.calls) == tasks.MAX_RETRIES + 1  # only the pushes that held the case asked
    [letter] = letters(store)
    assert (letter.operation, letter.case_id, letter.status) == ("push", stored.id, 503)


def test_a_partner_that_stays_unavailable_is_retried_a_bounded_number_of_times(store, unavailable_partner):
    stored = save(store, case_json())

    with retries_seen() as seen:
        assert tasks.push_case.apply(args=(stored.id, "p1", stored.version)).successful()

    assert len(seen) == tasks.MAX_RETRIES and all(e.status == 503 for e in seen)
    [letter] = letters(store)
    assert (letter.operation, letter.status) == ("push", 503)


def test_a_lease_that_never_runs_out_ends_in_a_dead_letter_not_a_lost_update(store, unavailable_partner):
    assert tasks.BUSY_RETRIES * sync_push.BUSY_RETRY_AFTER >= 10 * sync_push.LEASE_SECONDS
    stored = save(store, case_json())
    leave_lease(store, stored.id, now() + dt.timedelta(days=1))

    with retries_seen() as seen:
        assert tasks.push_case.apply(args=(stored.id, "p1", stored.version)).successful()

    assert len(seen) == tasks.BUSY_RETRIES and all(isinstance(e, sync_push.CaseBusy) for e in seen)
    assert not unavailable_partner.calls
    [letter] = letters(store)
    assert (letter.operation, letter.case_id, letter.status) == ("push", stored.id, None)
    assert "another push" in letter.error


def test_each_case_of_a_batch_that_fails_is_retried_alone_with_the_same_bound(store, unavailable_partner):
    first, second = save(store, case_json()), save(store, case_json(id="case-2", client={"id": "client-2"}))

    with retries_seen() as seen:
        assert tasks.push_cases.apply(args=("p1", [(first.id, first.version), (second.id, second.version)])).successful()

    # each case: its try in the batch, then MAX_RETRIES more as a push_case of its own (the batch's try
    # counts as the first failure, so the retries raised are one fewer)
    assert len(unavailable_partner.calls) == 2 * (tasks.MAX_RETRIES + 1)
    assert len(seen) == 2 * (tasks.MAX_RETRIES - 1) and all(e.status == 503 for e in seen)
    assert sorted((letter.case_id, letter.status) for letter in letters(store)) == sorted([(first.id, 503), (second.id, 503)])


def test_a_case_the_push_cannot_handle_becomes_a_dead_letter_and_the_batch_goes_on(store, unavailable_partner,
                                                                                   caplog):
    stored = save(store, case_json())

    with retries_seen() as seen, caplog.at_level("ERROR", logger="casebridge"):
        assert tasks.push_cases.apply(args=("p1", [("no-such-case", 1), (stored.id, stored.version)])).successful()

    assert len(seen) == tasks.MAX_RETRIES - 1  # the case after it was still pushed (and retried)
    by_case = {letter.case_id: letter for letter in letters(store)}
    assert "no case no-such-case" in by_case["no-such-case"].error
    assert by_case[stored.id].status == 503
    logged = caplog.text  # the fault by its type and frames; its message (which may quote data) is withheld
    assert "NotFound (message withheld)" in logged and "no case no-such-case" not in logged
