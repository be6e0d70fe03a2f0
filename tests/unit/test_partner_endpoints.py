"""A partner's endpoint is built once per thread and kept while the partner's settings stay the same:
one task after another reuses its connections, its access token and its rate limit."""
from __future__ import annotations

import threading

import pytest

from service import migrations, partners as registry
from service.store import Store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBRIDGE_HOME", str(tmp_path))
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrations.upgrade(store)
    registry.save_partner(store, {"id": "p1", "name": "Mercy General", "kind": "ehr",
                                  "base_url": "http://partner.test/fhir", "organizations": ["org-1"],
                                  "auth": {"type": "bearer", "token": "first"}})
    return store


def test_the_same_settings_give_the_same_endpoint(store):
    assert registry.endpoint_for(store, "p1") is registry.endpoint_for(store, "p1")


@pytest.mark.parametrize("change", [
    {"base_url": "http://elsewhere.test/fhir"},
    {"auth": {"type": "bearer", "token": "second"}},
    {"rate_limit": 5},
    {"quirks": {"search_page_cap": 100}},
])
def test_a_changed_setting_gives_a_new_endpoint(store, change):
    before = registry.endpoint_for(store, "p1")
    data = {"id": "p1", "name": "Mercy General", "kind": "ehr", "base_url": "http://partner.test/fhir",
            "organizations": ["org-1"], "auth": {"type": "bearer", "token": "first"}, **change}
    registry.save_partner(store, data)
    after = registry.endpoint_for(store, "p1")
    assert after is not before


def test_each_thread_builds_its_own(store):
    mine = registry.endpoint_for(store, "p1")
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(registry.endpoint_for(store, "p1")))
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine


def test_a_partners_rate_limit_is_kept_by_all_processes_together(store):
    from service.partner_pace import SharedPace

    now = 1_000_000.0  # a clock that stands still: each slot is given, not waited for
    # two worker processes (each its own pace object, the database shared), 4 requests a second
    first, second = (SharedPace(store, "p1", 4, clock=lambda: now, sleep=lambda seconds: None) for _ in range(2))
    slots = [now + pace.acquire() for pace in (first, second, first, second, first, second)]

    assert slots == [now + i * 0.25 for i in range(6)]  # one slot after another, whoever asks


def test_the_endpoint_of_a_rate_limited_partner_takes_its_slots_from_the_shared_pace(store):
    registry.save_partner(store, {"id": "p1", "name": "Mercy General", "kind": "ehr",
                                  "base_url": "http://partner.test/fhir", "organizations": ["org-1"],
                                  "auth": {"type": "bearer", "token": "first"}, "rate_limit": 2})
    endpoints = []
    thread = threading.Thread(target=lambda: endpoints.append(registry.endpoint_for(store, "p1")))
    thread.start()
    thread.join()
    endpoints.append(registry.endpoint_for(store, "p1"))

    waits = [endpoint.limiter.acquire() for endpoint in endpoints]  # two threads' endpoints, one pace
    assert waits[0] == 0.0 and 0.4 < waits[1] <= 0.5
    registry.delete_partner(store, "p1")  # its pace goes with it
