"""The partner registry over HTTP: admins only, their own organization's partners only, secrets never
returned."""
from __future__ import annotations

ADMIN = ("admin",)


def partner(**fields) -> dict:
    return {"id": "mercy", "name": "Mercy General", "kind": "ehr", "base_url": "http://127.0.0.1:9/fhir",
            "organizations": ["org-1"],
            "auth": {"type": "client_credentials", "token_url": "http://127.0.0.1:9/token", "client_id": "cb",
                     "client_secret": "s3cret"}, **fields}


def test_an_admin_registers_a_partner_and_never_sees_its_secret_again(client, make_key):
    admin = make_key(ADMIN)
    created = client.post("/partners", json=partner(), headers=admin)
    assert created.status_code == 201 and created.headers["Location"] == "/partners/mercy"
    body = created.get_json()
    assert "s3cret" not in created.get_data(as_text=True)
    assert body["auth"] == {"type": "client_credentials", "token_url": "http://127.0.0.1:9/token", "client_id": "cb",
                            "alg": "RS384", "has_client_secret": True}
    assert client.post("/partners", json=partner(), headers=admin).status_code == 409
    listed = client.get("/partners", headers=admin).get_json()["items"]
    assert [p["id"] for p in listed] == ["mercy"] and "s3cret" not in str(listed)
    status = client.get("/partners/mercy/status", headers=admin).get_json()
    assert status["backlog"] == 0 and status["dead_letters"] == 0


def test_another_organizations_partner_does_not_exist_for_you(client, make_key):
    assert client.post("/partners", json=partner(), headers=make_key(ADMIN)).status_code == 201
    other = make_key(ADMIN, organization="org-2")
    assert client.get("/partners", headers=other).get_json()["items"] == []
    for method, path in (("get", "/partners/mercy"), ("get", "/partners/mercy/status"),
                         ("delete", "/partners/mercy"), ("post", "/partners/mercy/pull")):
        assert getattr(client, method)(path, headers=other).status_code == 404, path


def test_a_partner_registered_over_the_api_shares_only_the_callers_cases(client, make_key):
    response = client.post("/partners", json=partner(organizations=["org-1", "org-2"]), headers=make_key(ADMIN))
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "organizations"


def test_the_registry_needs_the_admin_scope_and_names_bad_fields(client, make_key):
    writer = make_key(("cases:read", "cases:write"))
    assert client.get("/partners", headers=writer).status_code == 403
    bad = client.post("/partners", json=partner(pull_every_minutes=5, kind="hospital"), headers=make_key(ADMIN))
    assert bad.status_code == 400
    assert {e["field"] for e in bad.get_json()["errors"]} == {"pull_every_minutes", "kind"}


def test_an_unreachable_partner_is_a_502_not_a_500(client, make_key):
    admin = make_key(ADMIN)
    client.post("/partners", json=partner(), headers=admin)
    response = client.post("/partners/mercy/check", headers=admin)
    assert response.status_code == 502 and response.mimetype == "application/problem+json"
