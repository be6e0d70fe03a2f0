"""The JSON API over case records, over HTTP (Flask's test client): every route and every status."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from service import schemas

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
PROBLEM = "application/problem+json"
MERGE_PATCH = "application/merge-patch+json"


def record(case_id="case-1", organization="org-1", fixture="minimal", **fields) -> dict:
    data = json.loads((FIXTURES / f"{fixture}.json").read_text())
    data["id"] = case_id
    data["organization"] = {**data["organization"], "id": organization}
    data.update(fields)
    return data


def normalized(data: dict) -> dict:
    """The record as the service stores it (defaults filled in)."""
    return schemas.dump_case(schemas.load_case(data))


def fields_named(response) -> list[str]:
    assert response.mimetype == PROBLEM, response.get_data(as_text=True)
    return [e["field"] for e in response.get_json().get("errors", [])]


@pytest.fixture
def headers(make_key):
    return make_key()


@pytest.fixture
def create(client, headers):
    def create(data=None, **kwargs):
        response = client.post("/cases", json=data or record(**kwargs), headers=headers)
        assert response.status_code == 201, response.get_data(as_text=True)
        return response
    return create


def stored(client, headers, case_id="case-1"):
    response = client.get(f"/cases/{case_id}", headers=headers)
    assert response.status_code == 200
    return response.headers["ETag"], response.get_json()


# -- create and read --------------------------------------------------------------------------------
def test_create_answers_201_with_location_etag_and_the_stored_record(client, headers):
    data = record(fixture="discharge", case_id="dc-1")
    response = client.post("/cases", json=data, headers=headers)
    assert response.status_code == 201
    assert response.headers["Location"] == "http://testserver/cases/dc-1"
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Last-Modified"]
    assert response.get_json() == normalized(data)

    got = client.get("/cases/dc-1", headers=headers)
    assert got.status_code == 200
    assert got.mimetype == "application/json"
    assert got.get_json() == normalized(data)
    assert got.headers["ETag"] == 'W/"1"'
    assert got.headers["Last-Modified"] == response.headers["Last-Modified"]


def test_the_stored_record_is_normalized_with_defaults(client, headers):
    data = record(needs=[{"id": "n1", "domain": "food", "description": "Runs out of food"}])
    body = client.post("/cases", json=data, headers=headers).get_json()
    assert body["needs"][0]["status"] == "active"


def test_creating_an_existing_id_is_409(client, headers, create):
    create()
    response = client.post("/cases", json=record(title="again"), headers=headers)
    assert response.status_code == 409
    assert response.mimetype == PROBLEM
    assert stored(client, headers)[0] == 'W/"1"'


def test_a_record_of_another_organization_is_422_naming_organization_id(client, headers):
    response = client.post("/cases", json=record(organization="org-2"), headers=headers)
    assert response.status_code == 422
    assert fields_named(response) == ["organization.id"]
    assert client.get("/cases/case-1", headers=headers).status_code == 404


def test_an_unknown_case_is_404(client, headers):
    response = client.get("/cases/nope", headers=headers)
    assert response.status_code == 404
    assert response.mimetype == PROBLEM


# -- replace, patch, delete -------------------------------------------------------------------------
@pytest.mark.parametrize("if_match", ['W/"1"', '"1"', "*"])
def test_put_with_if_match_makes_a_new_version(client, headers, create, if_match):
    create()
    response = client.put("/cases/case-1", json=record(title="Renamed"),
                          headers={**headers, "If-Match": if_match})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["ETag"] == 'W/"2"'
    assert response.get_json()["title"] == "Renamed"
    assert stored(client, headers) == ('W/"2"', normalized(record(title="Renamed")))


def test_put_with_a_stale_version_is_412_and_changes_nothing(client, headers, create):
    create()
    client.put("/cases/case-1", json=record(title="Second"), headers={**headers, "If-Match": 'W/"1"'})
    response = client.put("/cases/case-1", json=record(title="Third"), headers={**headers, "If-Match": 'W/"1"'})
    assert response.status_code == 412
    assert response.mimetype == PROBLEM
    assert stored(client, headers) == ('W/"2"', normalized(record(title="Second")))


def test_put_without_if_match_is_428(client, headers, create):
    create()
    response = client.put("/cases/case-1", json=record(title="x"), headers=headers)
    assert response.status_code == 428
    assert response.mimetype == PROBLEM
    assert "If-Match" in response.get_json()["detail"]
    assert stored(client, headers)[0] == 'W/"1"'


def test_a_malformed_if_match_is_400_naming_it(client, headers, create):
    create()
    response = client.put("/cases/case-1", json=record(title="x"), headers={**headers, "If-Match": "one"})
    assert response.status_code == 400
    assert fields_named(response) == ["If-Match"]


def test_put_to_another_id_is_422_naming_id(client, headers, create):
    create()
    response = client.put("/cases/case-1", json=record(case_id="case-2"), headers={**headers, "If-Match": "*"})
    assert response.status_code == 422
    assert fields_named(response) == ["id"]
    assert client.get("/cases/case-2", headers=headers).status_code == 404


def test_put_to_an_unknown_case_is_404(client, headers):
    response = client.put("/cases/case-1", json=record(), headers={**headers, "If-Match": "*"})
    assert response.status_code == 404


def test_patch_merges_and_removes(client, headers, create):
    create(data=record(title="Old", opened="2024-01-02"))
    response = client.patch("/cases/case-1", data=json.dumps({"title": "New", "opened": None, "status": "active"}),
                            content_type=MERGE_PATCH, headers={**headers, "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["ETag"] == 'W/"2"'
    body = response.get_json()
    assert body["title"] == "New" and body["status"] == "active" and "opened" not in body


def test_patch_nested_object(client, headers, create):
    create(data=record(client={"preferred_name": "Walt", "gender": "male"}))
    response = client.patch("/cases/case-1", data=json.dumps({"client": {"gender": None, "language": "en"}}),
                            content_type=MERGE_PATCH, headers={**headers, "If-Match": "*"})
    assert response.status_code == 200
    assert response.get_json()["client"] == {"preferred_name": "Walt", "language": "en"}


def test_patch_rules(client, headers, create):
    create()
    patch = json.dumps({"title": "x"})
    assert client.patch("/cases/case-1", data=patch, content_type=MERGE_PATCH,
                        headers=headers).status_code == 428
    client.patch("/cases/case-1", data=patch, content_type=MERGE_PATCH, headers={**headers, "If-Match": '"1"'})
    stale = client.patch("/cases/case-1", data=json.dumps({"title": "y"}), content_type=MERGE_PATCH,
                         headers={**headers, "If-Match": '"1"'})
    assert stale.status_code == 412
    plain_json = client.patch("/cases/case-1", json={"title": "y"}, headers={**headers, "If-Match": '"2"'})
    assert plain_json.status_code == 415
    assert plain_json.mimetype == PROBLEM
    bad_value = client.patch("/cases/case-1", data=json.dumps({"status": "open"}), content_type=MERGE_PATCH,
                             headers={**headers, "If-Match": '"2"'})
    assert bad_value.status_code == 400
    assert fields_named(bad_value) == ["status"]
    assert stored(client, headers)[0] == 'W/"2"'


def test_delete_keeps_the_case_as_entered_in_error(client, headers, create):
    create(data=record(status="closed", closure_reason="Moved away", closed="2024-05-01"))
    response = client.delete("/cases/case-1", headers=headers)
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    body = response.get_json()
    assert body["status"] == "entered_in_error"
    assert "closure_reason" not in body

    etag, data = stored(client, headers)
    assert (etag, data) == ('W/"2"', body)
    assert client.get("/cases", headers=headers).get_json()["items"] == []
    deleted = client.get("/cases?status=entered_in_error", headers=headers).get_json()["items"]
    assert [i["id"] for i in deleted] == ["case-1"]
    history = client.get("/cases/case-1/history", headers=headers).get_json()["items"]
    assert [(h["version"], h["action"]) for h in history] == [(2, "delete"), (1, "create")]
    assert history[1]["case"]["closure_reason"] == "Moved away"

    again = client.delete("/cases/case-1", headers=headers)
    assert again.status_code == 200
    assert again.headers["ETag"] == 'W/"2"'


def test_delete_with_if_match(client, headers, create):
    create()
    assert client.delete("/cases/case-1", headers={**headers, "If-Match": 'W/"7"'}).status_code == 412
    assert stored(client, headers)[0] == 'W/"1"'
    assert client.delete("/cases/case-1", headers={**headers, "If-Match": 'W/"1"'}).status_code == 200
    assert client.delete("/cases/nope", headers=headers).status_code == 404


# -- history ----------------------------------------------------------------------------------------
def test_history_lists_every_version_newest_first(client, headers, create):
    create()
    for version, title in ((1, "Two"), (2, "Three")):
        client.put("/cases/case-1", json=record(title=title), headers={**headers, "If-Match": f'"{version}"'})
    response = client.get("/cases/case-1/history", headers=headers)
    assert response.status_code == 200
    items = response.get_json()["items"]
    assert [(i["version"], i["action"], i["case"].get("title")) for i in items] == [
        (3, "update", "Three"), (2, "update", "Two"), (1, "create", None)]
    assert all(i["recorded_at"].endswith("Z") for i in items)
    assert items[0]["recorded_at"] >= items[1]["recorded_at"] >= items[2]["recorded_at"]
    assert client.get("/cases/nope/history", headers=headers).status_code == 404


# -- list -------------------------------------------------------------------------------------------
def test_paging_through_120_cases_collects_each_once(client, headers, create):
    for i in range(120):
        create(case_id=f"case-{i:03d}")
    seen, url, pages = [], "/cases?limit=50", 0
    while url:
        response = client.get(url, headers=headers)
        assert response.status_code == 200
        body = response.get_json()
        assert len(body["items"]) <= 50
        seen += [item["id"] for item in body["items"]]
        url = body["next"]
        pages += 1
        if url:
            assert url.startswith("http://testserver/cases?")
            url = url.removeprefix("http://testserver")
    assert pages == 3
    assert sorted(seen) == [f"case-{i:03d}" for i in range(120)]
    assert len(seen) == len(set(seen))


def test_list_items(client, headers, create):
    create()
    item = client.get("/cases", headers=headers).get_json()["items"][0]
    assert item == {"id": "case-1", "version": 1, "status": "intake", "program": "other",
                    "created_at": item["created_at"], "updated_at": item["updated_at"], "case": normalized(record())}
    assert client.get("/cases", headers=headers).get_json()["next"] is None


def test_list_filters(client, headers, create):
    mrn = {"kind": "mrn", "system": "https://a.example/mrn", "value": "77"}
    other = {"kind": "mrn", "system": "https://b.example/mrn", "value": "77"}
    create(case_id="a", status="active", program="discharge", client={"identifiers": [mrn]})
    create(case_id="b", status="active", program="geriatric", client={"identifiers": [other]})
    create(case_id="c", status="intake", program="discharge")

    def ids(query):
        response = client.get(f"/cases?{query}", headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        return sorted(i["id"] for i in response.get_json()["items"])

    assert ids("status=active") == ["a", "b"]
    assert ids("program=discharge") == ["a", "c"]
    assert ids("status=active&program=discharge") == ["a"]
    assert ids("identifier=https://a.example/mrn|77") == ["a"]
    assert ids("identifier=77") == ["a", "b"]
    assert ids("identifier=88") == []
    assert ids("updated_since=2000-01-01") == ["a", "b", "c"]
    assert ids("updated_since=2999-01-01T00:00:00Z") == []
    assert ids("updated_since=2000-01-01T00:00:00%2B02:00") == ["a", "b", "c"]


@pytest.mark.parametrize("query, field", [
    ("status=open", "status"), ("program=x", "program"), ("limit=0", "limit"), ("limit=x", "limit"),
    ("limit=100000", "limit"), ("cursor=garbage", "cursor"), ("updated_since=2024-02-30", "updated_since"),
    ("updated_since=2024-06-03T14:30:00", "updated_since"), ("colour=red", "colour"), ("identifier=a|", "identifier"),
])
def test_bad_list_queries_are_400_naming_the_parameter(client, headers, query, field):
    response = client.get(f"/cases?{query}", headers=headers)
    assert response.status_code == 400
    assert fields_named(response) == [field]


# -- FHIR export and conversion ---------------------------------------------------------------------
@pytest.mark.parametrize("bundle_type", ["collection", "transaction"])
def test_a_case_as_a_fhir_bundle(client, headers, create, bundle_type):
    create(data=record(fixture="discharge", case_id="dc-1"))
    response = client.get(f"/cases/dc-1/fhir?type={bundle_type}", headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"
    bundle = response.get_json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == bundle_type
    assert all(e["fullUrl"].startswith("http://testserver/fhir/") for e in bundle["entry"])
    assert client.get("/cases/dc-1/fhir", headers=headers).get_json()["type"] == "collection"


def test_fhir_export_errors(client, headers, create):
    create()
    response = client.get("/cases/case-1/fhir?type=batch", headers=headers)
    assert response.status_code == 400
    assert fields_named(response) == ["type"]
    assert client.get("/cases/nope/fhir", headers=headers).status_code == 404


def test_convert_to_fhir(client, headers):
    data = record(fixture="discharge", case_id="dc-2024-0517-0042", organization="st-brigid-rmc")
    response = client.post("/convert/to-fhir?type=transaction", json=data, headers=headers)
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"
    Bundle.model_validate(response.get_json())
    assert response.get_json() == json.loads((GOLDEN / "discharge.transaction.json").read_text())
    assert client.get("/cases", headers=headers).get_json()["items"] == []
    bad = client.post("/convert/to-fhir", json={**data, "client": {"birth_date": "2023-02-30"}}, headers=headers)
    assert bad.status_code == 400
    assert fields_named(bad) == ["client.birth_date"]
    assert client.post("/convert/to-fhir?type=batch", json=data, headers=headers).status_code == 400


@pytest.mark.parametrize("content_type", ["application/fhir+json", "application/json", "application/x-ndjson",
                                          "application/fhir+ndjson"])
def test_convert_from_fhir(client, headers, content_type):
    bundle = json.loads((GOLDEN / "discharge.collection.json").read_text())
    if content_type.endswith("ndjson"):
        body = "\n".join(json.dumps(e["resource"]) for e in bundle["entry"]) + "\n"
    else:
        body = json.dumps(bundle)
    response = client.post("/convert/from-fhir", data=body, content_type=content_type, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    result = response.get_json()
    assert [c["id"] for c in result["cases"]] == ["dc-2024-0517-0042"]
    assert set(result) == {"cases", "unmapped", "warnings"}


def test_convert_from_fhir_bad_input(client, headers):
    assert client.post("/convert/from-fhir", data="{}", content_type="text/plain", headers=headers).status_code == 415
    response = client.post("/convert/from-fhir", data='{"resourceType": "Patient"}\n{oops\n',
                           content_type="application/x-ndjson", headers=headers)
    assert response.status_code == 400
    assert fields_named(response) == ["line 2"]
    invalid = client.post("/convert/from-fhir", json={"resourceType": "Patient", "birthDate": "2023-02-30"},
                          headers=headers)
    assert invalid.status_code == 400
    assert invalid.mimetype == PROBLEM


# -- import -----------------------------------------------------------------------------------------
def test_import_twice_gives_the_same_cases_and_no_duplicates(client, headers):
    bundle = (GOLDEN / "discharge.collection.json").read_text()
    first = client.post("/import", data=bundle, content_type="application/fhir+json", headers=headers)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["cases"] == [{"id": "dc-2024-0517-0042", "version": 1, "outcome": "created"}]
    second = client.post("/import", data=bundle, content_type="application/fhir+json", headers=headers)
    assert second.get_json()["cases"] == [{"id": "dc-2024-0517-0042", "version": 1, "outcome": "unchanged"}]
    items = client.get("/cases", headers=headers).get_json()["items"]
    assert [i["id"] for i in items] == ["dc-2024-0517-0042"]
    case = items[0]["case"]
    assert case["organization"]["id"] == "org-1"
    assert case["client"]["identifiers"][0]["value"] == "00118204"


def test_import_updates_a_case_that_changed(client, headers):
    bundle = json.loads((GOLDEN / "discharge.collection.json").read_text())
    client.post("/import", json=bundle, headers=headers)
    changed = copy.deepcopy(bundle)
    plan = next(e["resource"] for e in changed["entry"] if e["resource"]["resourceType"] == "CarePlan")
    plan["title"] = "A new title"
    response = client.post("/import", json=changed, headers=headers)
    assert response.get_json()["cases"] == [{"id": "dc-2024-0517-0042", "version": 2, "outcome": "updated"}]
    assert stored(client, headers, "dc-2024-0517-0042")[1]["title"] == "A new title"
    history = client.get("/cases/dc-2024-0517-0042/history", headers=headers).get_json()["items"]
    assert [h["action"] for h in history] == ["update", "create"]


def test_import_ndjson_matches_on_the_client_identifier(client, headers):
    patient = {"resourceType": "Patient", "id": "p-1", "name": [{"family": "Okafor"}],
               "identifier": [{"system": "https://a.example/mrn", "value": "77"}]}
    first = client.post("/import", data=json.dumps(patient), content_type="application/fhir+ndjson", headers=headers)
    assert first.status_code == 200, first.get_data(as_text=True)
    [created] = first.get_json()["cases"]
    assert created["outcome"] == "created"
    again = client.post("/import", data=json.dumps({**patient, "id": "p-2"}), content_type="application/x-ndjson",
                        headers=headers)
    [matched] = again.get_json()["cases"]
    assert matched["id"] == created["id"]
    assert matched["outcome"] in ("updated", "unchanged")
    assert len(client.get("/cases", headers=headers).get_json()["items"]) == 1


def test_import_reports_unmapped_resources(client, headers):
    bundle = json.loads((GOLDEN / "minimal.collection.json").read_text())
    bundle["entry"].append({"fullUrl": "urn:uuid:6a0c8f4e-0000-4000-8000-000000000001",
                            "resource": {"resourceType": "Observation", "status": "final",
                                         "code": {"text": "weight"}}})
    body = client.post("/import", json=bundle, headers=headers).get_json()
    assert [u["resourceType"] for u in body["unmapped"]] == ["Observation"]
    assert "resource" not in body["unmapped"][0]


def test_import_of_invalid_fhir_is_400_and_stores_nothing(client, headers):
    response = client.post("/import", json={"resourceType": "Bundle", "type": "collection",
                                            "entry": [{"resource": {"resourceType": "Patient", "gender": "x"}}]},
                           headers=headers)
    assert response.status_code == 400
    assert response.get_json()["errors"]
    assert client.get("/cases", headers=headers).get_json()["items"] == []
    assert client.post("/import", data="x", content_type="text/csv", headers=headers).status_code == 415


def test_import_is_per_organization(client, make_key):
    bundle = (GOLDEN / "minimal.collection.json").read_text()
    mine, theirs = make_key(), make_key(organization="org-2")
    assert client.post("/import", data=bundle, content_type="application/fhir+json", headers=mine).status_code == 200
    # case ids are global: the same case id in another organization is a conflict, never a takeover
    response = client.post("/import", data=bundle, content_type="application/fhir+json", headers=theirs)
    assert response.status_code == 409
    assert response.mimetype == PROBLEM
    assert client.get("/cases", headers=theirs).get_json()["items"] == []


# -- authentication, scopes, tenancy ----------------------------------------------------------------
ROUTES = [
    ("post", "/cases"), ("get", "/cases"), ("get", "/cases/case-1"), ("put", "/cases/case-1"),
    ("patch", "/cases/case-1"), ("delete", "/cases/case-1"), ("get", "/cases/case-1/history"),
    ("get", "/cases/case-1/fhir"), ("post", "/convert/to-fhir"), ("post", "/convert/from-fhir"),
    ("post", "/import"),
]


@pytest.mark.parametrize("method, path", ROUTES)
def test_without_a_key_is_401_with_www_authenticate(client, method, path):
    response = getattr(client, method)(path, json={})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == PROBLEM
    bad_key = getattr(client, method)(path, json={}, headers={"Authorization": "Bearer cb_nope_nope"})
    assert bad_key.status_code == 401


@pytest.mark.parametrize("method, path", ROUTES)
def test_without_the_scope_is_403(client, make_key, method, path):
    scope = "cases:read" if method in ("get",) or path.startswith("/convert") else "cases:write"
    others = [s for s in ("cases:read", "cases:write", "fhir:read", "fhir:write") if s != scope]
    response = getattr(client, method)(path, json={}, headers=make_key(others))
    assert response.status_code == 403
    assert response.mimetype == PROBLEM


def test_another_organizations_case_is_404(client, headers, create, make_key):
    create()
    theirs = make_key(organization="org-2")
    patch = json.dumps({"title": "x"})
    responses = [
        client.get("/cases/case-1", headers=theirs),
        client.put("/cases/case-1", json=record(organization="org-2"), headers={**theirs, "If-Match": '"1"'}),
        client.patch("/cases/case-1", data=patch, content_type=MERGE_PATCH, headers={**theirs, "If-Match": '"1"'}),
        client.delete("/cases/case-1", headers=theirs),
        client.get("/cases/case-1/history", headers=theirs),
        client.get("/cases/case-1/fhir", headers=theirs),
    ]
    assert [r.status_code for r in responses] == [404] * 6
    unknown = client.get("/cases/no-such-case", headers=theirs)
    assert responses[0].get_json()["detail"] == unknown.get_json()["detail"].replace("no-such-case", "case-1")
    assert client.get("/cases", headers=theirs).get_json()["items"] == []
    assert stored(client, headers) == ('W/"1"', normalized(record()))


# -- bad input changes nothing ----------------------------------------------------------------------
BAD_BODIES = [
    # (body, content type, status, field or None)
    (b'{"id": "case-1", ', "application/json", 400, ""),
    (b"[]", "application/json", 400, ""),
    (json.dumps(record(title="x")).encode(), "text/plain", 415, None),
    (json.dumps(record(title="x")).encode(), None, 415, None),
    (json.dumps(record(client={"birth_date": "2023-02-30"})).encode(), "application/json", 400, "client.birth_date"),
    (json.dumps(record(opened="2024-06-03T14:30:00")).encode(), "application/json", 400, "opened"),
    (json.dumps(record(ssn="123-45-6789")).encode(), "application/json", 400, "ssn"),
    (json.dumps(record(status="open")).encode(), "application/json", 400, "status"),
    (json.dumps(record(title="")).encode(), "application/json", 400, "title"),
    (json.dumps(record(closure_reason="why")).encode(), "application/json", 422, "closure_reason"),
    (json.dumps(record(organization="org-2")).encode(), "application/json", 422, "organization.id"),
    (json.dumps(record(title="x", fhir=json.loads("[" * 100 + "]" * 100))).encode(), "application/json", 400, ""),
]


def _send(client, method, path, body, content_type, headers):
    kwargs = {"data": body, "headers": headers}
    if content_type:
        kwargs["content_type"] = content_type
    return getattr(client, method)(path, **kwargs)


@pytest.mark.parametrize("body, content_type, status, field", BAD_BODIES)
def test_bad_bodies_are_4xx_naming_the_field_and_change_nothing(client, headers, create, body, content_type, status,
                                                                 field):
    create()
    before = stored(client, headers)
    for method, path, extra in (("put", "/cases/case-1", {"If-Match": 'W/"1"'}), ("post", "/cases", {})):
        response = _send(client, method, path, body, content_type, {**headers, **extra})
        assert response.status_code == status, (method, response.get_data(as_text=True))
        assert response.mimetype == PROBLEM
        if field is not None:
            assert field in fields_named(response), response.get_json()
        assert stored(client, headers) == before
    assert len(client.get("/cases", headers=headers).get_json()["items"]) == 1


@pytest.mark.parametrize("patch, status, field", [
    (b'{"title": ', 400, ""),
    (b'{"client": {"birth_date": "2023-02-30"}}', 400, "client.birth_date"),
    (b'{"colour": "red"}', 400, "colour"),
    (b'{"id": "case-2"}', 422, "id"),
    (b'{"organization": {"id": "org-2"}}', 422, "organization.id"),
    (b'{"program": null}', 400, "program"),
    (b'"not an object"', 400, ""),
])
def test_bad_patches_change_nothing(client, headers, create, patch, status, field):
    create()
    before = stored(client, headers)
    response = client.patch("/cases/case-1", data=patch, content_type=MERGE_PATCH,
                            headers={**headers, "If-Match": 'W/"1"'})
    assert response.status_code == status, response.get_data(as_text=True)
    assert field in fields_named(response)
    assert stored(client, headers) == before


def test_an_oversized_body_is_413_problem_json(app, client, headers, create):
    create()
    before = stored(client, headers)
    app.config["MAX_CONTENT_LENGTH"] = 2000
    big = record(title="x" * 5000)
    for response in (client.post("/cases", json={**big, "id": "case-2"}, headers=headers),
                     client.put("/cases/case-1", json=big, headers={**headers, "If-Match": "*"}),
                     client.post("/import", json={"resourceType": "Patient", "text": {"div": "x" * 5000}},
                                 headers=headers)):
        assert response.status_code == 413
        assert response.mimetype == PROBLEM
    assert stored(client, headers) == before
    assert client.get("/cases/case-2", headers=headers).status_code == 404


def test_unknown_methods_are_405_problem_json(client, headers):
    response = client.post("/cases/case-1", json={}, headers=headers)
    assert response.status_code == 405
    assert response.mimetype == PROBLEM
