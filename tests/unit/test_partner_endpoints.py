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
