"""The FHIR API driven by a published client, SMART on FHIR's ``fhirclient`` (R4 models), against
the app served over real HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from fhirclient import server as fhir_server
from fhirclient.models.bundle import Bundle
from fhirclient.models.careplan import CarePlan
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.goal import Goal
from fhirclient.models.servicerequest import ServiceRequest
from fhirclient.models.task import Task

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"


@pytest.fixture
def live(tmp_path):
    """(the FHIR base URL, the store, an API key) of the app served on a free port."""
    from service import auth, create_app

    app = create_app({"database_url": f"sqlite:///{tmp_path / 'casebridge.db'}", "base_url": ""})
    store = app.extensions["casebridge"].store
    key = auth.create_key(store, "org-1", ["fhir:read", "fhir:write"])
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}/fhir", store, key
    finally:
        http.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def smart(live):
    base, store, key = live
    for name in ("realistic", "discharge"):
        data = json.loads((FIXTURES / f"{name}.json").read_text())
        data["organization"]["id"] = "org-1"
        store.add_case("org-1", data)
    srv = fhir_server.FHIRServer(None, base_uri=base)
    srv.session.headers["Authorization"] = f"Bearer {key}"
    return srv


def test_capability_statement(smart):
    statement = smart.capabilityStatement
    assert statement.fhirVersion == "4.0.1"
    assert {r.type for r in statement.rest[0].resource} >= {"CarePlan", "ServiceRequest", "Task"}


def test_read_a_plan_and_search_by_patient_and_category(smart):
    bundle = FHIRSearch(CarePlan, {"category": "assess-plan"}).perform(smart)
    assert isinstance(bundle, Bundle) and bundle.total == 2
    first = bundle.entry[0].resource
    plan = CarePlan.read(first.id, smart)
    assert plan.id == first.id and plan.status and plan.subject.reference.startswith("Patient/")
    patient_id = plan.subject.reference.split("/", 1)[1]
    found = CarePlan.where({"patient": patient_id, "category": "http://hl7.org/fhir/us/core/CodeSystem/"
                                                                  "careplan-category|assess-plan"}).perform_resources(smart)
    assert [p.id for p in found] == [plan.id]
    goals = Goal.where({"patient": patient_id}).perform_resources(smart)
    assert {f"Goal/{g.id}" for g in goals} == {g.reference for g in plan.goal}


def test_follow_paging(smart):
    every = Goal.where({"_count": "500"}).perform_resources(smart)
    pages = list(Goal.where({"_count": "2"}).perform_iter(smart))
    assert len(pages) == (len(every) + 1) // 2 and all(p.total == len(every) for p in pages)
    ids = [e.resource.id for page in pages for e in page.entry or ()]
    assert len(ids) == len(set(ids)) == len(every)
    assert set(ids) == {g.id for g in every}


def test_post_a_referral_and_see_its_task(smart):
    plan = CarePlan.where({"category": "assess-plan"}).perform_resources(smart)[0]
    referral = ServiceRequest({
        "status": "active", "intent": "order", "subject": {"reference": plan.subject.reference},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "464131000124100",
                             "display": "Referral to food pantry program"}]},
        "authoredOn": "2024-06-03"})
    created = referral.create(smart)
    assert created["resourceType"] == "ServiceRequest" and created["id"]
    request = ServiceRequest.read(created["id"], smart)
    assert request.code.coding[0].code == "464131000124100"
    tasks = Task.where({"focus": f"ServiceRequest/{request.id}"}).perform_resources(smart)
    assert len(tasks) == 1 and tasks[0].status == "requested"
    # the case team accepts it; the EHR sees the new status
    task = tasks[0]
    task.status = "accepted"
    task.update(smart)
    assert Task.read(task.id, smart).status == "accepted"
