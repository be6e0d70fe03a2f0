"""A code outside the value set R4 binds *required* (ContactPoint.system, Patient.gender, Condition's
clinicalStatus, ...) is refused over HTTP: a 400 that names the element path and the allowed codes (an
OperationOutcome under /fhir, problem+json on /import), and nothing is stored. The codes and paths one by
one: tests/unit/test_fhir_coded_values.py."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

FHIR = "application/fhir+json"
CONTACT_POINT_SYSTEMS = ("phone", "fax", "email", "pager", "url", "sms", "other")


@pytest.fixture
def headers(make_key) -> dict:
    return make_key(("cases:read", "cases:write", "fhir:read", "fhir:write"))


def patient(**extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-9"}],
            "name": [{"family": "Quarrington", "given": ["Ada"]}], "birthDate": "1980-02-03", **extra}


def refused(response, path: str) -> dict:
    """The 400 OperationOutcome, its one issue at ``path``."""
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.mimetype == FHIR
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert [issue["expression"] for issue in body["issue"]] == [[path]]
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["code"] == "invalid"
    return body["issue"][0]


def nothing_stored(client, headers) -> None:
    for resource_type in ("Patient", "CarePlan", "Condition"):
        response = client.get(f"/fhir/{resource_type}", headers=headers)
        assert response.status_code == 200 and response.get_json().get("entry", []) == [], resource_type
    response = client.get("/cases", headers=headers)
    assert response.status_code == 200 and response.get_json()["items"] == []


def test_post_patient_with_a_bad_telecom_system_is_a_400_and_stores_nothing(client, headers) -> None:
    bad = patient(telecom=[{"system": "Vexmoor", "value": "555-0100"}])
    issue = refused(client.post("/fhir/Patient", json=bad, headers=headers), "Patient.telecom[0].system")
    assert "'Vexmoor'" in issue["diagnostics"] and "contact-point-system" in issue["diagnostics"]
    for code in CONTACT_POINT_SYSTEMS:
        assert code in issue["diagnostics"]
    nothing_stored(client, headers)
    # the same Patient with a code of the value set is stored
    good = patient(telecom=[{"system": "phone", "value": "555-0100"}])
    response = client.post("/fhir/Patient", json=good, headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["telecom"][0]["system"] == "phone"


BAD_PATIENTS = {
    "Patient.gender": {"gender": "F"},
    "Patient.telecom[1].use": {"telecom": [{"system": "email", "value": "a@example.org"},
                                           {"system": "phone", "value": "1", "use": "cell"}]},
    "Patient.address[0].use": {"address": [{"use": "shelter", "city": "Springfield"}]},
    "Patient.address[0].type": {"address": [{"type": "street", "city": "Springfield"}]},
    "Patient.name[0].use": {"name": [{"use": "legal", "family": "Quarrington"}]},
    "Patient.identifier[0].use": {"identifier": [{"use": "primary", "system": "urn:oid:1.2.3", "value": "MRN-9"}]},
    "Patient.contact[0].telecom[0].system": {"contact": [{"name": {"text": "Sam"},
                                                          "telecom": [{"system": "walkie", "value": "9"}]}]},
}


@pytest.mark.parametrize("path", BAD_PATIENTS)
def test_post_patient_with_any_bad_code_names_its_path(client, headers, path: str) -> None:
    refused(client.post("/fhir/Patient", json=patient(**BAD_PATIENTS[path]), headers=headers), path)
    nothing_stored(client, headers)


def test_put_with_a_bad_code_leaves_the_stored_patient_as_it_was(client, headers) -> None:
    response = client.post("/fhir/Patient", json=patient(telecom=[{"system": "sms", "value": "1"}]), headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    stored = response.get_json()
    changed = {**stored, "telecom": [{"system": "Vexmoor", "value": "1"}]}
    refused(client.put(f"/fhir/Patient/{stored['id']}", json=changed, headers={**headers, "If-Match": 'W/"1"'}),
            "Patient.telecom[0].system")
    read = client.get(f"/fhir/Patient/{stored['id']}", headers=headers).get_json()
    assert read["meta"]["versionId"] == "1" and read["telecom"] == [{"system": "sms", "value": "1"}]


def test_post_condition_with_a_clinical_status_outside_its_value_set(client, headers) -> None:
    created = client.post("/fhir/Patient", json=patient(), headers=headers).get_json()
    condition = {"resourceType": "Condition", "subject": {"reference": f"Patient/{created['id']}"},
                 "code": {"text": "Housing instability"}, "clinicalStatus": {"coding": [
                     {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "cured"}]}}
    issue = refused(client.post("/fhir/Condition", json=condition, headers=headers),
                    "Condition.clinicalStatus.coding[0].code")
    assert "'cured'" in issue["diagnostics"] and "resolved" in issue["diagnostics"]
    assert client.get("/fhir/Condition", headers=headers).get_json().get("entry", []) == []


def test_a_transaction_with_a_bad_code_is_refused_whole(client, headers) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:4b0f3d2e-0000-4000-8000-000000000001",
         "resource": patient(telecom=[{"system": "Vexmoor", "value": "1"}]),
         "request": {"method": "POST", "url": "Patient"}}]}
    refused(client.post("/fhir", json=bundle, headers=headers), "Bundle.entry[0].resource.telecom[0].system")
    nothing_stored(client, headers)


def test_import_with_a_bad_code_is_a_problem_naming_the_path(client, headers) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:4b0f3d2e-0000-4000-8000-000000000002",
         "resource": patient(telecom=[{"system": "Vexmoor", "value": "1"}])}]}
    response = client.post("/import", json=bundle, headers=headers)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert [e["field"] for e in response.get_json()["errors"]] == ["Bundle.entry[0].resource.telecom[0].system"]
    nothing_stored(client, headers)
