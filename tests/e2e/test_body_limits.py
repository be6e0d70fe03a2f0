"""Request bodies past the configured limits, on each surface that takes a body.

- Size: the limit is ``max_body_bytes``, set through the environment (``CASEBRIDGE_MAX_BODY_BYTES``) or
  through ``create_app``'s config. A body one byte past it is 413 (``application/problem+json`` on the
  JSON API, an ``OperationOutcome`` on the FHIR API); the same body at or under it is accepted; a
  refused body stores nothing. The same holds for a body sent without ``Content-Length`` (chunked), as
  gunicorn hands such a body on, and for the real server (``casebridge serve``).
- Nesting: JSON nested deeper than ``max_json_depth``, up to 100,000 levels, is a 400 that names the
  problem (an ``OperationOutcome`` on the FHIR API), never a 500 or a crash, and stores nothing.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from service import auth, create_app
from service.store import case_versions, cases, fhir_resources
from tests.e2e.serving import create_key, serving

pytestmark = pytest.mark.e2e

LIMIT = 4096
ORG = "org-1"
FHIR = "application/fhir+json"
PROBLEM = "application/problem+json"
NDJSON = "application/fhir+ndjson"
SCOPES = ["cases:read", "cases:write", "fhir:read", "fhir:write"]


# -- the app with a configured limit ---------------------------------------------------------------
def build(tmp_path: Path, config: dict | None = None):
    app = create_app({"database_url": f"sqlite:///{tmp_path / 'casebridge.db'}", "base_url": "http://testserver",
                      "home": tmp_path, **(config or {})})
    key = auth.create_key(app.extensions["casebridge"].store, ORG, SCOPES)
    return app, {"Authorization": f"Bearer {key}"}


@pytest.fixture(params=["environment", "config"])
def limited(request, tmp_path, monkeypatch):
    """The app with a body limit of LIMIT bytes, set through CASEBRIDGE_MAX_BODY_BYTES or through
    ``create_app({"max_body_bytes": ...})``; and the headers of a key."""
    monkeypatch.delenv("CASEBRIDGE_MAX_BODY_BYTES", raising=False)
    if request.param == "environment":
        monkeypatch.setenv("CASEBRIDGE_MAX_BODY_BYTES", str(LIMIT))
        return build(tmp_path)
    return build(tmp_path, {"max_body_bytes": LIMIT})


def test_create_app_config_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBRIDGE_MAX_BODY_BYTES", "100")
    app, headers = build(tmp_path, {"max_body_bytes": LIMIT})
    body = padded(patient("cfg"), LIMIT)
    response = app.test_client().post("/fhir/Patient", data=body, content_type=FHIR, headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)


def stored_rows(app) -> tuple[int, int, int]:
    """(cases, case versions, FHIR index rows), read straight from the database."""
    with app.extensions["casebridge"].store.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (cases, case_versions, fhir_resources))


# -- bodies of an exact size -----------------------------------------------------------------------
def padded(document, size: int, end: bytes = b"") -> bytes:
    """``document`` as JSON, padded with spaces (still the same JSON) to exactly ``size`` bytes."""
    raw = json.dumps(document).encode()
    assert len(raw) + len(end) <= size, f"the document is {len(raw)} bytes, more than {size}"
    return raw + b" " * (size - len(raw) - len(end)) + end


def patient(tag: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": f"MRN-{tag}"}],
            "name": [{"family": f"Okafor{tag}", "given": ["Ada"]}], "gender": "female", "birthDate": "1980-02-03"}


def case_record(tag: str) -> dict:
    return {"id": f"case-{tag}", "program": "other", "status": "intake", "organization": {"id": ORG},
            "client": {}, "title": f"case {tag}"}


def transaction(tag: str) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{tag}", "resource": patient(tag), "request": {"method": "POST", "url": "Patient"}}]}


#: path, content type, the document for a tag, the status when accepted, the media type of a 413
SURFACES = {
    "POST /cases": ("/cases", "application/json", case_record, 201, PROBLEM),
    "POST /import": ("/import", FHIR, lambda tag: {**patient(tag), "id": f"p-{tag}"}, 200, PROBLEM),
    "POST /fhir/Patient": ("/fhir/Patient", FHIR, patient, 201, FHIR),
    "POST /fhir": ("/fhir", FHIR, transaction, 200, FHIR),
}


def assert_too_large(response, mimetype: str) -> None:
    assert response.status_code == 413, response.get_data(as_text=True)
    assert response.mimetype == mimetype
    body = response.get_json()
    if mimetype == FHIR:
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["code"] == "too-costly"
    else:
        assert body["status"] == 413 and body["detail"]


@pytest.mark.parametrize("surface", SURFACES)
def test_a_body_one_byte_past_the_configured_limit_is_413_and_stores_nothing(limited, surface):
    app, headers = limited
    client = app.test_client()
    path, content_type, document, accepted, mimetype = SURFACES[surface]
    before = stored_rows(app)
    assert_too_large(client.post(path, data=padded(document("over"), LIMIT + 1), content_type=content_type,
                                 headers=headers), mimetype)
    assert stored_rows(app) == before
    for tag, size in (("at", LIMIT), ("under", LIMIT - 1)):  # the same kind of body: accepted
        response = client.post(path, data=padded(document(tag), size), content_type=content_type, headers=headers)
        assert response.status_code == accepted, response.get_data(as_text=True)
    assert stored_rows(app) != before


# -- bodies without Content-Length (chunked) -------------------------------------------------------
def chunked(client, path: str, body: bytes, content_type: str, headers: dict):
    """``body`` sent as gunicorn hands on a chunked request: no Content-Length, and the server's word
    that it ends the stream (``wsgi.input_terminated``)."""
    return client.post(path, input_stream=io.BytesIO(body),
                       headers={**headers, "Content-Type": content_type, "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True})


def ndjson_ending_at(size: int, tag: str, more: int) -> bytes:
    """NDJSON Patients whose first lines end exactly at ``size`` bytes, then ``more`` lines more: a body
    cut at the limit would still parse, and import only some of what was sent."""
    lines, n = b"", 0
    while True:
        line = json.dumps({**patient(f"{tag}{n}"), "id": f"{tag}-{n}"}).encode() + b"\n"
        if len(lines) + len(line) > size - 100:
            break
        lines, n = lines + line, n + 1
    lines = lines[:-1] + b" " * (size - len(lines)) + b"\n"
    assert len(lines) == size
    return lines + b"".join(json.dumps({**patient(f"{tag}x{k}"), "id": f"{tag}-x{k}"}).encode() + b"\n"
                            for k in range(more))


@pytest.mark.parametrize("surface", SURFACES)
def test_a_chunked_body_past_the_limit_is_413_not_cut_short(limited, surface):
    app, headers = limited
    client = app.test_client()
    path, content_type, document, accepted, mimetype = SURFACES[surface]
    before = stored_rows(app)
    for size in (LIMIT + 1, LIMIT + 10_000):
        assert_too_large(chunked(client, path, padded(document(f"over{size}"), size), content_type, headers), mimetype)
    assert stored_rows(app) == before
    response = chunked(client, path, padded(document("at"), LIMIT), content_type, headers)
    assert response.status_code == accepted, response.get_data(as_text=True)


def test_chunked_ndjson_past_the_limit_is_413_not_a_partial_import(limited):
    app, headers = limited
    client = app.test_client()
    before = stored_rows(app)
    body = ndjson_ending_at(LIMIT, "cut", more=3)
    assert_too_large(chunked(client, "/import", body, NDJSON, headers), PROBLEM)
    assert stored_rows(app) == before
    assert client.get("/cases", headers=headers).get_json()["items"] == []
    whole = ndjson_ending_at(LIMIT, "whole", more=0)
    response = chunked(client, "/import", whole, NDJSON, headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(response.get_json()["cases"]) == whole.count(b"\n")


# -- deep nesting ----------------------------------------------------------------------------------
def arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def in_patient(depth: int) -> str:
    return '{"resourceType":"Patient","extension":%s}' % arrays(depth - 1)


def in_bundle(depth: int) -> str:
    return ('{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient",'
            '"extension":%s},"request":{"method":"POST","url":"Patient"}}]}' % arrays(depth))


SHAPES = {"arrays": arrays, "objects": objects, "in a Patient": in_patient, "in a Bundle": in_bundle}
DEPTHS = [65, 1_000, 1_025, 100_000]  # past max_json_depth (64); past orjson's own limit (1024); far past


@pytest.fixture
def deep(tmp_path, monkeypatch):
    monkeypatch.delenv("CASEBRIDGE_MAX_BODY_BYTES", raising=False)
    monkeypatch.delenv("CASEBRIDGE_MAX_JSON_DEPTH", raising=False)
    return build(tmp_path)


def assert_refused_for_nesting(response, mimetype: str) -> None:
    assert response.status_code == 400, response.get_data(as_text=True)[:500]
    assert response.mimetype == mimetype
    body = response.get_json()
    if mimetype == FHIR:
        assert body["resourceType"] == "OperationOutcome"
        (issue,) = body["issue"]
        assert issue["severity"] == "error" and issue["code"] == "invalid"
        message = issue["diagnostics"]
    else:
        message = " ".join([body["detail"], *(e["message"] for e in body.get("errors", ()))])
    assert "nested deeper than 64 levels" in message or "depth limit exceeded" in message, message


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir"])
def test_deeply_nested_json_to_the_fhir_api_is_an_operation_outcome(deep, caplog, path, shape, depth):
    app, headers = deep
    before = stored_rows(app)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().post(path, data=SHAPES[shape](depth), content_type=FHIR, headers=headers)
    assert_refused_for_nesting(response, FHIR)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
    assert stored_rows(app) == before


@pytest.mark.parametrize("depth", [65, 100_000])
@pytest.mark.parametrize("path, content_type", [("/cases", "application/json"), ("/import", FHIR),
                                                ("/import", NDJSON)])
def test_deeply_nested_json_to_the_json_api_is_problem_json(deep, caplog, path, content_type, depth):
    app, headers = deep
    before = stored_rows(app)
    body = objects(depth) if content_type != NDJSON else json.dumps(patient("fine")) + "\n" + objects(depth)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().post(path, data=body, content_type=content_type, headers=headers)
    assert_refused_for_nesting(response, PROBLEM)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
    assert stored_rows(app) == before


def test_nesting_at_the_configured_depth_is_not_refused_for_depth(tmp_path, monkeypatch):
    """max_json_depth, set through the environment, is the line: at it the body is read (and judged on
    what it says), one past it is refused for its depth."""
    monkeypatch.setenv("CASEBRIDGE_MAX_JSON_DEPTH", "8")
    app, headers = build(tmp_path)
    client = app.test_client()
    at = {**patient("deep"), "name": [{"family": "Okafor", "given": ["Ada"],
                                       "extension": [{"url": "urn:x", "valueCodeableConcept": {
                                           "coding": [{"code": "a"}]}}]}]}  # 8 levels: a coding
    response = client.post("/fhir/Patient", json=at, headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    over = client.post("/fhir/Patient", data=arrays(9), content_type=FHIR, headers=headers)
    assert over.status_code == 400 and "nested deeper than 8 levels" in over.get_json()["issue"][0]["diagnostics"]


# -- the real server -------------------------------------------------------------------------------
def _in_pieces(body: bytes, size: int = 1000):
    """A generator, so requests sends the body chunked (no Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


@pytest.mark.integration
def test_casebridge_serve_takes_the_limit_from_the_environment(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, CASEBRIDGE_HOME=str(home), CASEBRIDGE_DATABASE_URL=f"sqlite:///{home / 'casebridge.db'}",
               CASEBRIDGE_MAX_BODY_BYTES=str(LIMIT))
    env.pop("CASEBRIDGE_MAX_JSON_DEPTH", None)
    with serving(env, tmp_path, "--workers", "1", "--no-sync") as port:
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {create_key(env, tmp_path, ORG, ','.join(SCOPES))}"}

        def post(path, body, content_type, pieces=False):
            return requests.post(f"{base}{path}", data=_in_pieces(body) if pieces else body, timeout=30,
                                 headers={**headers, "Content-Type": content_type})

        def count() -> int:
            return len(requests.get(f"{base}/cases?limit=500", headers=headers, timeout=30).json()["items"])

        for pieces in (False, True):
            over = post("/fhir/Patient", padded(patient("over"), LIMIT + 1), FHIR, pieces)
            assert over.status_code == 413, over.text
            assert over.headers["Content-Type"].startswith(FHIR) and over.json()["issue"][0]["code"] == "too-costly"
            over = post("/cases", padded(case_record("over"), LIMIT + 1), "application/json", pieces)
            assert over.status_code == 413 and over.headers["Content-Type"].startswith(PROBLEM), over.text
            cut = post("/import", ndjson_ending_at(LIMIT, f"cut{pieces}", more=2), NDJSON, pieces)
            assert cut.status_code == 413, cut.text
        assert count() == 0
        for pieces in (False, True):
            at = post("/fhir/Patient", padded(patient(f"at{pieces}"), LIMIT), FHIR, pieces)
            assert at.status_code == 201, at.text
        assert count() == 2

        deep = post("/fhir/Patient", arrays(2_000).encode(), FHIR)  # 4,000 bytes: under the size limit
        assert deep.status_code == 400 and deep.json()["issue"][0]["code"] == "invalid", deep.text
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    assert "Traceback" not in (tmp_path / "serve.log").read_text(errors="replace")
