"""No client data in logs: what a case record or a FHIR resource holds (names, birth dates, identifiers,
notes, addresses, phone numbers, codes), request headers and query values never reach the logs, for
FHIR writes (a Patient, a referral with its Task, a transaction), bodies the service refuses (FHIR
resources and case records, whose answer may quote the bad value: the log must not), imports (a
Bundle, NDJSON), a 500 (logged by route, type and frames, never the exception's message), warnings, and
gunicorn's error log under ``casebridge serve``.

Each test plants distinctive marker values and captures everything: every log record (root logger at
DEBUG, formatted with its exception, its arguments and extra fields), every warning issued, and
standard output and error."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.e2e.serving import create_key, serving

pytestmark = pytest.mark.e2e

FHIR = "application/fhir+json"
PROBLEM = "application/problem+json"
ROOT = Path(__file__).resolve().parents[2]

# -- the markers: values no log line has any other reason to hold --------------------------------
FAMILY, GIVEN = "Quillfeather", "Oriane"
MRN, MEMBER_ID = "MRN-QX770341", "MBR4471926"
BIRTH_DATE = "1931-08-17"
PHONE = "+1-555-0199-7310"
STREET, CITY = "4471 Juniperwick Lane", "Tarrowmere"
NOTE = "prefers calls after dusk; the dog is called Biscotti"
CODE = "ZQ7041"
QUERY = "Brackenholt"
BAD = "Vexmoor"  # inside values the service refuses
MARKERS = (FAMILY, GIVEN, "QX770341", "4471926", BIRTH_DATE, "0199-7310", "Juniperwick", CITY, "Biscotti", CODE,
           QUERY, BAD)


class Output:
    """Everything an operator could see while a test runs."""

    def __init__(self, capfd) -> None:
        self.capfd = capfd
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.warnings: list[warnings.WarningMessage] = []
        self.streams: list[str] = []

    def text(self) -> str:
        out, err = self.capfd.readouterr()
        self.streams += [out, err]
        caught = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in self.warnings]
        return "\n".join(self.lines + caught + self.streams)

    def assert_clean(self, markers=MARKERS) -> str:
        text = self.text()
        folded = text.casefold()
        leaked = [m for m in markers if m.casefold() in folded]
        lines = [line for line in text.splitlines() if any(m.casefold() in line.casefold() for m in leaked)]
        assert not leaked, f"client data in the output: {leaked}\n" + "\n".join(lines[:20])
        return text


class _Collect(logging.Handler):
    FORMAT = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def __init__(self, output: Output) -> None:
        super().__init__(logging.DEBUG)
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        # formatted now (with its traceback, as any handler would write it), and every field besides
        self.output.lines.append(f"{self.FORMAT.format(record)} {vars(record)!r}")
        self.output.records.append(record)


@pytest.fixture
def output(capfd):
    captured = Output(capfd)
    handler = _Collect(captured)
    root = logging.getLogger()
    level = root.level
    # a logger that does not propagate (casebridge's own, once configured) writes to the handler too
    apart = [logger for logger in logging.Logger.manager.loggerDict.values()
             if isinstance(logger, logging.Logger) and not logger.propagate]
    for logger in (root, *apart):
        logger.addHandler(handler)
    root.setLevel(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captured.warnings = caught
        yield captured
    root.setLevel(level)
    for logger in (root, *apart):
        logger.removeHandler(handler)


@pytest.fixture
def headers(make_key) -> dict:
    return make_key()


def requests_logged(output: Output) -> list[str]:
    return [r.getMessage() for r in output.records if r.name == "casebridge.request"]


# -- resources carrying the markers ----------------------------------------------------------------
def patient(**fields) -> dict:
    return {"resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3", "value": MRN},
                           {"system": "https://payer.example.org/member-id", "value": MEMBER_ID}],
            "name": [{"family": FAMILY, "given": [GIVEN]}], "gender": "female", "birthDate": BIRTH_DATE,
            "telecom": [{"system": "phone", "value": PHONE}],
            "address": [{"line": [STREET], "city": CITY, "state": "TX", "postalCode": "78210"}], **fields}


def referral(subject: str) -> dict:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-category",
                                      "code": "sdoh"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100",
                                 "display": "Referral to food pantry program"}], "text": f"pantry in {CITY}"},
            "subject": {"reference": subject}, "authoredOn": "2024-06-03", "requester": {"display": "Dr. Ehr"},
            "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": CODE}]}],
            "note": [{"text": NOTE}]}


def task(focus: str, subject: str) -> dict:
    return {"resourceType": "Task", "status": "requested", "intent": "order", "focus": {"reference": focus},
            "for": {"reference": subject}, "note": [{"text": NOTE}]}


# -- FHIR writes -------------------------------------------------------------------------------------
def test_fhir_writes_log_no_client_data(client, headers, output) -> None:
    created = client.post("/fhir/Patient", json=patient(),
                          headers={**headers, "If-None-Exist": f"identifier=urn:oid:1.2.3|{MRN}"})
    assert created.status_code == 201, created.json
    assert created.json["name"][0]["family"] == FAMILY  # the data went through
    patient_id = created.json["id"]
    updated = client.put(f"/fhir/Patient/{patient_id}",
                         json=patient(id=patient_id, telecom=[{"system": "phone", "value": PHONE},
                                                              {"system": "email", "value": f"{FAMILY}@example.org"}]),
                         headers={**headers, "If-Match": created.headers["ETag"]})
    assert updated.status_code == 200, updated.json

    ordered = client.post("/fhir/ServiceRequest", json=referral(f"Patient/{patient_id}"), headers=headers)
    assert ordered.status_code == 201, ordered.json
    tasks = client.get(f"/fhir/Task?focus=ServiceRequest/{ordered.json['id']}", headers=headers).json
    assert tasks["total"] == 1
    accepted = {**tasks["entry"][0]["resource"], "status": "accepted", "note": [{"text": NOTE}],
                "businessStatus": {"text": f"call {PHONE}"}}
    assert client.put(f"/fhir/Task/{accepted['id']}", json=accepted, headers=headers).status_code == 200

    patient_url = "urn:uuid:11111111-1111-4111-8111-111111111111"
    request_url = "urn:uuid:22222222-2222-4222-8222-222222222222"
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_url, "resource": patient(identifier=[{"system": "urn:oid:1.2.3", "value": f"{MRN}-2"}]),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": request_url, "resource": referral(patient_url),
         "request": {"method": "POST", "url": "ServiceRequest"}},
        {"resource": task(request_url, patient_url), "request": {"method": "POST", "url": "Task"}},
        {"request": {"method": "GET", "url": f"Patient?name={FAMILY}&birthdate={BIRTH_DATE}"}},
    ]}
    response = client.post("/fhir", json=transaction, headers=headers)
    assert response.status_code == 200, response.json
    assert [e["response"]["status"] for e in response.json["entry"]][:3] == ["201 Created"] * 3

    # searches: query values, a form body
    found = client.get(f"/fhir/Patient?name={FAMILY}&birthdate={BIRTH_DATE}&identifier={MRN}", headers=headers)
    assert found.status_code == 200 and found.json["total"] >= 1
    assert client.get(f"/fhir/Patient?name={QUERY}&gender=female", headers=headers).status_code == 200
    assert client.get(f"/fhir/ServiceRequest?code={CODE}&patient={patient_id}", headers=headers).status_code == 200
    assert client.post("/fhir/Patient/_search", data={"name": QUERY, "identifier": MEMBER_ID},
                       headers=headers).status_code == 200
    everything = client.get(f"/fhir/Patient/{patient_id}/$everything?_since={QUERY}", headers=headers)
    assert everything.status_code == 400, everything.json

    output.assert_clean()
    logged = requests_logged(output)
    assert len(logged) == 11 and logged[0].startswith("POST /fhir/<any(")  # the requests were logged


# -- bodies and queries the service refuses --------------------------------------------------------
def test_refused_fhir_bodies_log_no_client_data(client, headers, output) -> None:
    created = client.post("/fhir/Patient", json=patient(), headers=headers)
    assert created.status_code == 201, created.json
    patient_id = created.json["id"]
    refused = [
        ("post", "/fhir/Patient", patient(gender=BAD), "Patient.gender"),
        ("post", "/fhir/Patient", patient(birthDate=f"{BAD}-17"), "Patient.birthDate"),
        ("post", "/fhir/Patient", patient(name=f"{BAD} {FAMILY}"), "Patient.name"),
        ("post", "/fhir/Patient", patient(active=BAD), "Patient.active"),
        ("post", "/fhir/Patient", patient(telecom=[{"system": "phone", "value": {"number": PHONE}}]),
         "Patient.telecom[0].value"),
        ("put", f"/fhir/Patient/{patient_id}", patient(id=patient_id, birthDate="1931-02-30"), "Patient.birthDate"),
        ("put", f"/fhir/Patient/{patient_id}", patient(id=f"{BAD}-id"), None),
        ("post", "/fhir/ServiceRequest", {**referral(f"Patient/{patient_id}"), "status": BAD},
         "ServiceRequest.status"),
        ("post", "/fhir/ServiceRequest", referral(f"Patient/{BAD}"), "ServiceRequest.subject"),
        ("post", "/fhir/Task", {**task(f"ServiceRequest/{BAD}", f"Patient/{patient_id}"), "intent": BAD}, None),
        ("post", "/fhir", {"resourceType": "Bundle", "type": BAD, "entry": []}, None),
        ("post", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient(gender=BAD), "request": {"method": "POST", "url": "Patient"}},
            {"resource": task("ServiceRequest/x", f"Patient/{patient_id}"),
             "request": {"method": "PUT", "url": f"Task/{BAD}"}}]}, None),
        ("post", "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": patient(birthDate=BAD), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient?birthdate={BAD}"}},
            {"request": {"method": "GET", "url": f"Patient/{BAD}"}}]}, None),
    ]
    for method, url, body, expression in refused:
        response = getattr(client, method)(url, json=body, headers=headers)
        if body.get("type") == "batch":  # answered entry by entry
            assert response.status_code == 200, response.json
            assert [e["response"]["status"][:1] for e in response.json["entry"]] == ["4"] * 3, response.json
            continue
        assert 400 <= response.status_code < 500, (url, response.json)
        assert response.json["resourceType"] == "OperationOutcome", response.json
        if expression:  # the answer names the field (and may quote the value)
            expressions = [e for issue in response.json["issue"] for e in issue.get("expression", ())]
            assert expression in expressions, response.json
    broken = json.dumps(patient(gender=BAD))[:-20].encode()  # not JSON: cut short
    assert client.post("/fhir/Patient", data=broken, headers={**headers, "Content-Type": FHIR}).status_code == 400
    assert client.post("/fhir/Patient", data=f"<Patient>{FAMILY}</Patient>",
                       headers={**headers, "Content-Type": "application/fhir+xml"}).status_code == 415
    for query in (f"birthdate={BAD}", f"{BAD}=1", f"_count={BAD}", f"_format={BAD}", f"_sort={BAD}",
                  f"_lastUpdated=ge{BAD}", f"identifier={BAD}|{MRN}&_include={BAD}"):
        response = client.get(f"/fhir/Patient?{query}", headers=headers)
        assert 400 <= response.status_code < 500, (query, response.json)
    assert client.get("/fhir/Patient", headers={**headers, "Accept": f"text/{BAD}"}).status_code == 406
    assert client.put(f"/fhir/Patient/{patient_id}", json=patient(id=patient_id),
                      headers={**headers, "If-Match": f'W/"{BAD}"'}).status_code == 400

    output.assert_clean()
    assert len(requests_logged(output)) == 1 + len(refused) + 2 + 7 + 2


# -- case records the validator (marshmallow) refuses, and their conversion --------------------------
def case_record(**client) -> dict:
    return {"id": "case-logs-1", "program": "other", "status": "intake", "organization": {"id": "org-1"},
            "client": {"names": [{"family": FAMILY, "given": [GIVEN]}], "birth_date": BIRTH_DATE, "phone": PHONE,
                       "identifiers": [{"kind": "member_id", "system": "https://payer.example.org/id",
                                        "value": MEMBER_ID}],
                       "address": {"lines": [STREET], "city": CITY}, **client}}


def test_refused_case_records_log_no_client_data(client, headers, output) -> None:
    created = client.post("/cases", json=case_record(), headers=headers)
    assert created.status_code == 201, created.json
    refused = [case_record(birth_date=f"{BAD}-17"), case_record(gender=BAD), case_record(names=BAD),
               case_record(**{BAD: FAMILY}), {**case_record(), "id": "case-logs-2", "status": BAD}]
    for record in refused:
        response = client.post("/cases", json={**record, "id": "case-logs-2"}, headers=headers)
        assert response.status_code == 400 and response.mimetype == PROBLEM, response.json
        assert response.json["errors"], response.json
    patch = client.patch("/cases/case-logs-1", json={"client": {"birth_date": BAD}},
                         headers={**headers, "Content-Type": "application/merge-patch+json", "If-Match": "*"})
    assert patch.status_code == 400, patch.json
    converted = client.post("/convert/to-fhir?type=transaction", json=case_record(), headers=headers)
    assert converted.status_code == 200, converted.json
    assert client.post(f"/convert/to-fhir?type={BAD}", json=case_record(), headers=headers).status_code == 400

    output.assert_clean()
    assert len(requests_logged(output)) == 1 + len(refused) + 3


# -- /import -----------------------------------------------------------------------------------------
def test_import_logs_no_client_data(client, headers, output) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": patient(id="p-1")},
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": {**referral("Patient/p-1"), "id": "sr-1"}},
        {"fullUrl": "urn:uuid:33333333-3333-4333-8333-333333333333",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": NOTE},
                      "subject": {"reference": "Patient/p-1"}}},  # not mapped: reported back, not logged
    ]}
    imported = client.post("/import", json=bundle, headers=headers)
    assert imported.status_code == 200, imported.json
    assert imported.json["cases"][0]["outcome"] == "created"
    ndjson = "\n".join(json.dumps(r) for r in (
        patient(id="p-2", identifier=[{"system": "urn:oid:1.2.3", "value": f"{MRN}-3"}]),
        {**referral("Patient/p-2"), "id": "sr-2"}))
    imported = client.post("/import", data=ndjson, content_type="application/fhir+ndjson", headers=headers)
    assert imported.status_code == 200, imported.json
    converted = client.post("/convert/from-fhir", data=ndjson, content_type="application/x-ndjson", headers=headers)
    assert converted.status_code == 200, converted.json

    refused = [
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient(gender=BAD)}]}, FHIR),
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient(birthDate=BAD)}]}, FHIR),
        ({"resourceType": "Bundle", "type": BAD}, FHIR),
        (json.dumps(patient()) + "\n" + json.dumps(patient(gender=BAD)), "application/fhir+ndjson"),
        (json.dumps(patient()) + "\n" + json.dumps(patient())[:-9] + f" {BAD}", "application/x-ndjson"),
        (json.dumps(patient(telecom=BAD)), "application/ndjson"),
    ]
    for body, content_type in refused:
        data = body if isinstance(body, str) else json.dumps(body)
        response = client.post("/import", data=data, content_type=content_type, headers=headers)
        assert response.status_code == 400, response.json
        assert response.mimetype == PROBLEM and response.json["errors"], response.json
    response = client.post("/convert/from-fhir", json=patient(birthDate=BAD), headers=headers)
    assert response.status_code == 400

    output.assert_clean()
    assert requests_logged(output)[0].startswith("POST /import 200 ")
    assert len(requests_logged(output)) == 3 + len(refused) + 1


# -- a 500 -------------------------------------------------------------------------------------------
def _parse_birth_date():
    """A fault as a real one looks: client data in the exception's message, a cause chained to it."""
    from flask import request

    record = request.get_json()
    try:
        return dt.date.fromisoformat(record["birth_date"])  # ValueError: Invalid isoformat string: '...'
    except ValueError as error:
        raise LookupError(f"no age for {record['name']}") from error


def _answer_late(response):
    from flask import request

    if request.path.endswith("/late"):  # a hook failing after the view has answered
        dt.date.fromisoformat(request.get_json()["birth_date"])
    return response


def test_a_500_is_logged_by_route_type_and_frames_without_the_message(app, client, headers, output) -> None:
    app.add_url_rule("/test-only/<kind>/boom", "boom", lambda kind: _parse_birth_date(), methods=["POST"])
    app.add_url_rule("/fhir/test-only/boom", "fhir_boom", _parse_birth_date, methods=["POST"])
    app.add_url_rule("/test-only/late", "late", lambda: "ok", methods=["POST"])
    app.after_request(_answer_late)
    body = {"birth_date": f"{BAD}-08-17", "name": f"{GIVEN} {FAMILY}"}

    response = client.post(f"/test-only/{QUERY}/boom?name={QUERY}", json=body, headers=headers)
    assert response.status_code == 500 and response.mimetype == PROBLEM
    assert response.json == {"type": "about:blank", "title": "Internal error", "status": 500,
                             "detail": "an unexpected error occurred; it has been logged"}
    response = client.post("/fhir/test-only/boom", json=body, headers=headers)
    assert response.status_code == 500 and response.mimetype == FHIR
    assert response.json["resourceType"] == "OperationOutcome"
    assert response.json["issue"][0]["code"] == "exception"
    response = client.post("/test-only/late", json=body, headers=headers)
    assert response.status_code == 500 and response.mimetype == PROBLEM

    text = output.assert_clean()
    errors = [r for r in output.records if r.levelno >= logging.ERROR]
    assert len(errors) >= 3 and all(r.exc_info is None for r in errors)
    first, fhir, late = (r.getMessage() for r in errors[:3])
    assert first.startswith("unexpected error handling POST /test-only/<kind>/boom: ")
    assert (errors[0].route, errors[0].error_type) == ("/test-only/<kind>/boom", "LookupError")
    # what an operator needs: each exception's type, the frames (file, line, function), the chain
    frame = re.compile(r'File ".*test_logs_privacy\.py", line \d+, in _parse_birth_date')
    assert frame.search(first) and "ValueError (message withheld)" in first
    assert "The above exception was the direct cause of the following exception:" in first
    assert first.rstrip().endswith("LookupError (message withheld)")
    assert fhir.startswith("unexpected error handling POST /fhir/test-only/boom: ") and frame.search(fhir)
    assert late.startswith("unexpected error handling POST /test-only/late: ")
    assert re.search(r"line \d+, in _answer_late\n", late) and late.endswith("ValueError (message withheld)")
    assert "Traceback (most recent call last):" in text


# -- warnings --------------------------------------------------------------------------------------
def test_served_logs_hold_exceptions_and_warnings_without_their_messages(tmp_path) -> None:
    """``casebridge serve``'s logging (``configure``), in a process of its own: an exception logged by
    any casebridge logger keeps its type and frames, a library's warning its category and place."""
    script = f"""
import datetime, logging, warnings
from service import logging as casebridge_logging
casebridge_logging.configure("debug")
warnings.warn("could not serialize {FAMILY!r} as a date")
try:
    datetime.date.fromisoformat({BAD!r})
except ValueError as error:
    logging.getLogger("casebridge.sync").exception("push of case %s to partner %s failed", "case-1", "ehr-1")
    logging.getLogger("casebridge").warning("refused: %s", error)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for marker in MARKERS:
        assert marker not in output, output
    assert "casebridge.warnings: UserWarning at <string>:5 (message withheld)" in output
    assert "casebridge.sync: push of case case-1 to partner ehr-1 failed\nTraceback (most recent call last):" in output
    assert 'File "<string>", line 7, in <module>\nValueError (message withheld)' in output
    assert "casebridge: refused: ValueError" in output


# -- gunicorn ----------------------------------------------------------------------------------------
def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)
        answer = b""
        try:
            while chunk := connection.recv(4096):
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return answer


@pytest.mark.integration
def test_gunicorn_error_log_holds_no_query_header_or_body(tmp_path) -> None:
    import requests

    home = tmp_path / "home"
    env = dict(os.environ, CASEBRIDGE_HOME=str(home), CASEBRIDGE_DATABASE_URL=f"sqlite:///{home / 'casebridge.db'}")
    log_path = tmp_path / "serve.log"
    with serving(env, tmp_path, "--workers", "1", "--no-sync", "--log-level", "debug", log=log_path) as port:
        key = create_key(env, tmp_path, "org-1", "cases:read,cases:write,fhir:read,fhir:write")
        auth = f"Authorization: Bearer {key}\r\n"

        # requests gunicorn cannot parse: it answers 400 and logs why
        bad = [f"GET /cases?name={FAMILY} {GIVEN} HTTP/1.1\r\nHost: x\r\n\r\n",
               f"GET /cases?name={FAMILY}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
               f"GET /cases HTTP/1.1\r\nHost: x\r\nX {MRN}: 1\r\n\r\n",
               f"GET /cases HTTP/1.1\r\nHost: x\r\nX-Client: {FAMILY}\x00\r\n\r\n",
               f"{QUERY} /cases HTTP/1.1\r\nHost: x\r\n\r\n",
               f"GET /cases?name={QUERY} HTTP/{BIRTH_DATE}\r\nHost: x\r\n\r\n"]
        for request in bad:
            assert _raw(port, request.encode()).startswith(b"HTTP/1.1 400 "), request
        # a body gunicorn cannot read, in the middle of a request the app is answering: a 400
        body = f"zz{FAMILY}\r\n{{\"client\": \"{GIVEN}\"}}\r\n0\r\n\r\n"
        answer = _raw(port, (f"POST /cases?name={QUERY} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json"
                             f"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}").encode())
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        # and requests that succeed or are refused by the app, with client data in the path, query and body
        base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        assert requests.post(f"{base}/fhir/Patient", json=patient(), headers=headers, timeout=30).status_code == 201
        assert requests.get(f"{base}/fhir/Patient/{FAMILY}", headers=headers, timeout=30).status_code == 404
        assert requests.get(f"{base}/fhir/Patient?name={QUERY}", headers=headers, timeout=30).status_code == 200
        assert requests.post(f"{base}/fhir/Patient?x={QUERY}", json=patient(gender=BAD), headers=headers,
                             timeout=30).status_code == 400
    text = log_path.read_text(errors="replace")
    leaked = [m for m in MARKERS if m.casefold() in text.casefold()]
    assert not leaked, (leaked, [line for line in text.splitlines() if any(m in line for m in leaked)])
    assert key.split("_", 2)[2] not in text
    # what gunicorn logged, without what it quoted
    assert "Invalid request from ip=127.0.0.1: Invalid HTTP request line\n" in text
    assert "Invalid request from ip=127.0.0.1: Invalid HTTP header name\n" in text
    assert "Invalid request from ip=127.0.0.1: Invalid HTTP method\n" in text
    assert "POST /fhir/<any(" in text and " 201 " in text
