"""Writers racing each other over HTTP, on SQLite and on PostgreSQL: optimistic versions let exactly
one of two writers of the same version win, and two copies of the same import make one case."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from service import auth, create_app, services
from tests.integration.simultaneous import at_once

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
ROUNDS = 20


@pytest.fixture
def app(database_url):
    app = create_app({"database_url": database_url, "base_url": "http://testserver"})
    yield app
    app.extensions["casebridge"].store.engine.dispose()


@pytest.fixture
def headers(app):
    key = auth.create_key(app.extensions["casebridge"].store, "org-1", ["cases:read", "cases:write"])
    return {"Authorization": f"Bearer {key}"}


def record(case_id: str, **fields) -> dict:
    data = json.loads((FIXTURES / "discharge.json").read_text())
    return {**data, "id": case_id, "organization": {**data["organization"], "id": "org-1"}, **fields}


def test_two_updates_of_the_same_version_exactly_one_wins(app, headers):
    client = app.test_client()
    assert client.post("/cases", json=record("race"), headers=headers).status_code == 201
    for round_ in range(ROUNDS):
        version = round_ + 1

        def put(c, i):
            return c.put("/cases/race", json=record("race", title=f"round {round_} writer {i}"),
                         headers={**headers, "If-Match": f'W/"{version}"'})

        responses = at_once(app, put)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 412], [r.get_data(as_text=True) for r in responses]
        winner = next(r for r in responses if r.status_code == 200)
        loser = next(r for r in responses if r.status_code == 412)
        assert loser.mimetype == "application/problem+json"
        current = client.get("/cases/race", headers=headers)
        assert current.headers["ETag"] == f'W/"{version + 1}"' == winner.headers["ETag"]
        assert current.get_json()["title"] == winner.get_json()["title"]
    history = client.get("/cases/race/history", headers=headers).get_json()["items"]
    assert [h["version"] for h in history] == list(range(ROUNDS + 1, 0, -1))


def test_two_patches_of_the_same_version_exactly_one_wins(app, headers):
    client = app.test_client()
    client.post("/cases", json=record("patched"), headers=headers)
    for round_ in range(ROUNDS):
        def patch(c, i):
            return c.patch("/cases/patched", data=json.dumps({"title": f"{round_}-{i}"}),
                           content_type="application/merge-patch+json",
                           headers={**headers, "If-Match": f'"{round_ + 1}"'})

        assert sorted(r.status_code for r in at_once(app, patch)) == [200, 412]


def test_two_imports_of_the_same_bundle_at_once_make_one_case(app, headers):
    client = app.test_client()
    for round_ in range(ROUNDS // 2):
        bundle = json.dumps(services.convert_to_fhir(record(f"imported-{round_}")))

        def send(c, i):
            return c.post("/import", data=bundle, content_type="application/fhir+json", headers=headers)

        responses = at_once(app, send)
        assert [r.status_code for r in responses] == [200, 200], [r.get_data(as_text=True) for r in responses]
        outcomes = sorted(r.get_json()["cases"][0]["outcome"] for r in responses)
        assert outcomes == ["created", "unchanged"]
        assert {r.get_json()["cases"][0]["id"] for r in responses} == {f"imported-{round_}"}
    items = client.get("/cases?limit=500", headers=headers).get_json()["items"]
    assert sorted(i["id"] for i in items) == sorted(f"imported-{r}" for r in range(ROUNDS // 2))
    assert all(i["version"] == 1 for i in items)


def test_two_imports_matched_by_client_identifier_at_once_make_one_case(app, headers):
    client = app.test_client()
    patient = {"resourceType": "Patient", "name": [{"family": "Okafor"}],
               "identifier": [{"system": "https://a.example/mrn", "value": "77"}]}

    def send(c, i):  # the partner gave the same client two resource ids
        return c.post("/import", data=json.dumps({**patient, "id": f"p-{i}"}),
                      content_type="application/fhir+ndjson", headers=headers)

    responses = at_once(app, send)
    assert [r.status_code for r in responses] == [200, 200], [r.get_data(as_text=True) for r in responses]
    assert len({r.get_json()["cases"][0]["id"] for r in responses}) == 1
    assert len(client.get("/cases", headers=headers).get_json()["items"]) == 1


def test_use_cases_directly_one_of_two_writers_wins(app):
    store = app.extensions["casebridge"].store
    who = auth.Actor("org-1", None, frozenset({"cases:read", "cases:write"}))
    services.create_case(store, who, record("direct"))
    for round_ in range(ROUNDS):
        barrier = threading.Barrier(2)
        outcomes: list = [None, None]

        def write(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = services.replace_case(store, who, "direct", record("direct", title=f"{round_}/{i}"),
                                                    round_ + 1).version
            except services.Conflict as error:
                outcomes[i] = error.status

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(outcomes) == [round_ + 2, 412]
