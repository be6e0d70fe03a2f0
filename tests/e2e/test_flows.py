"""The three flows casebridge exists for, end to end: the JSON API, a real sync worker (a subprocess on
the embedded SQLite broker) and a real FHIR server (tests/fhir_server) as the partner.

1. A hospital's discharge plan shared with the next provider.
2. An insurer and a hospital exchanging a high-risk member's plan: two casebridge instances, the
   insurer's pushing to the FHIR server as its payer partner, the hospital's pulling from it.
3. An EHR's referral accepted and completed, its status flowing back to the EHR's Task.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_server.fixtures import fhir_server
from service import auth as keys
from service import sync

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "fixtures" / "cases"
ADMIN_SCOPES = ["admin", "cases:read", "cases:write", "fhir:read", "fhir:write"]

full = fhir_server("full")


class Instance:
    """One casebridge: the app (called over its WSGI interface) and, when started, a worker process."""

    def __init__(self, home: Path, organization: str, monkeypatch, eager: bool = False) -> None:
        from service import create_app

        self.home = home
        self.env = {"CASEBRIDGE_HOME": str(home), "CASEBRIDGE_DATABASE_URL": f"sqlite:///{home / 'casebridge.db'}",
                    "CASEBRIDGE_BROKER_URL": f"sqla+sqlite:///{home / 'broker.db'}"}
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        home.mkdir(parents=True, exist_ok=True)
        self.app = create_app()
        if eager:
            self.app.extensions["celery"].conf.update(task_always_eager=True, task_eager_propagates=True)
        self.store = self.app.extensions["casebridge"].store
        self.http = self.app.test_client()
        key = keys.create_key(self.store, organization, ADMIN_SCOPES)
        self.http.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        self.worker = None

    def start_worker(self) -> None:
        self.log = open(self.home / "worker.log", "w")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--beat", "--pool", "threads", "--concurrency", "2",
             "--loglevel", "WARNING"],
            cwd=ROOT, env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)}, stdout=self.log,
            stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        if self.worker is not None:
            self.log.close()

    def call(self, method: str, path: str, expect: int, **kwargs):
        reply = self.http.open(path, method=method, **kwargs)
        assert reply.status_code == expect, (method, path, reply.status_code, reply.get_data(as_text=True))
        return reply

    def wait(self, condition, timeout=45.0, what="the worker"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.3)
        log = (self.home / "worker.log").read_text()[-3000:] if (self.home / "worker.log").exists() else ""
        raise AssertionError(f"{what} did not get there within {timeout}s; worker log:\n{log}")

    def sync_of(self, case_id: str) -> dict:
        return {p["partner"]: p for p in self.call("GET", f"/cases/{case_id}/sync", 200).get_json()["partners"]}


@pytest.fixture
def instances(tmp_path, monkeypatch):
    made = []

    def make(name, organization, eager=False):
        instance = Instance(tmp_path / name, organization, monkeypatch, eager)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.stop()


def case_json(name: str, organization: str) -> dict:
    data = json.loads((CASES / name).read_text())
    data["organization"] = {"id": organization}
    return data


def ours_at(server, rtype: str, local_id: str) -> list[dict]:
    bundle = requests.get(f"{server.base_url}/{rtype}", params={"identifier": f"{sync.SYNC_SYSTEM}|{local_id}"},
                          timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", ())]


def search(server, rtype: str, **params) -> list[dict]:
    bundle = requests.get(f"{server.base_url}/{rtype}", params={"_count": "200", **params}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", ())]


def synced(instance, case_id, partner_id):
    state = instance.sync_of(case_id).get(partner_id)
    return state if state and state["status"] == "synced" and state["synced_version"] >= state["wanted_version"] \
        else None


# -- 1. discharge plan to the next provider ----------------------------------------------------------
def test_a_discharge_plan_is_shared_with_the_next_provider(instances, full):
    hospital = instances("hospital", "st-brigid")
    hospital.call("POST", "/partners", 201, json={
        "id": "home-health", "name": "Lakeside Home Health", "kind": "ehr", "base_url": full.base_url,
        "organizations": ["st-brigid"], "programs": ["discharge"], "profile": full.partner_profile})
    route = hospital.call("POST", "/partners/home-health/check", 200).get_json()["route"]
    assert route["mode"] == "full plan"
    hospital.start_worker()

    created = hospital.call("POST", "/cases", 201, json=case_json("discharge.json", "st-brigid")).get_json()
    state = hospital.wait(lambda: synced(hospital, created["id"], "home-health"), what="the discharge plan")
    assert state["synced_version"] == 1
    ids = {r["resource_type"]: r["remote_id"] for r in state["resources"]}

    plan = requests.get(f"{full.base_url}/CarePlan/{ids['CarePlan']}", timeout=10).json()
    first_version = plan["meta"]["versionId"]
    assert plan["title"] == created["title"] and plan["status"] == "active"
    assert plan["subject"]["reference"] == f"Patient/{ids['Patient']}"
    goals = search(full, "Goal", subject=f"Patient/{ids['Patient']}")
    assert sorted(g["description"]["text"] for g in goals) == sorted(g["description"] for g in created["goals"])
    assert {g["reference"] for g in plan["goal"]} == {f"Goal/{g['id']}" for g in goals}
    status = hospital.call("GET", "/partners/home-health/status", 200).get_json()
    assert status["backlog"] == 0 and status["dead_letters"] == 0

    # the plan changes at the hospital: the next provider's copy follows
    reply = hospital.call("PATCH", f"/cases/{created['id']}", 200, json={"title": "Discharge plan, revised"},
                          headers={"If-Match": 'W/"1"', "Content-Type": "application/merge-patch+json"})
    assert reply.get_json()["title"] == "Discharge plan, revised"
    hospital.wait(lambda: (s := synced(hospital, created["id"], "home-health")) and s["synced_version"] == 2)
    plan = requests.get(f"{full.base_url}/CarePlan/{ids['CarePlan']}", timeout=10).json()
    assert plan["title"] == "Discharge plan, revised" and plan["meta"]["versionId"] != first_version


# -- 2. insurer and hospital, a high-risk member's plan ------------------------------------------------
MEMBER_SYSTEM = "https://lakeshorehealthplan.example.com/fhir/sid/member-id"


def test_an_insurer_shares_only_its_high_risk_members_plan_which_the_hospital_pulls(instances, full):
    insurer = instances("insurer", "lakeshore-chp")
    insurer.call("POST", "/partners", 201, json={
        "id": "plan-fhir", "name": "Lakeshore payer FHIR API", "kind": "payer", "base_url": full.base_url,
        "organizations": ["lakeshore-chp"], "high_risk_only": True, "profile": full.partner_profile})
    insurer.call("POST", "/partners/plan-fhir/check", 200)
    # the member as the payer's FHIR API holds them
    full.load({"resourceType": "Patient", "id": "member-4471829", "name": [{"family": "Okafor", "given": ["Tamara"]}],
               "birthDate": "1978-01-22", "identifier": [
                   {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]},
                    "system": MEMBER_SYSTEM, "value": "LCH4471829-01"}]})
    insurer.start_worker()

    high = insurer.call("POST", "/cases", 201, json=case_json("insurer_high_risk.json", "lakeshore-chp")).get_json()
    moderate = case_json("insurer_high_risk.json", "lakeshore-chp")
    moderate.update(id="lch-cc-2024-40000", risk={"level": "moderate", "assessed": "2024-03-01"})
    moderate["client"] = {**moderate["client"], "id": "mbr-other", "identifiers": [
        {"kind": "member_id", "system": MEMBER_SYSTEM, "value": "LCH0000001-01"}]}
    insurer.call("POST", "/cases", 201, json=moderate)

    state = insurer.wait(lambda: synced(insurer, high["id"], "plan-fhir"), what="the high-risk plan")
    assert state["member_id"] == f"{MEMBER_SYSTEM}|LCH4471829-01"  # $member-match found the member
    assert insurer.sync_of("lch-cc-2024-40000") == {}  # not high risk: never shared
    plans = search(full, "CarePlan")
    assert len(plans) == 1 and plans[0]["subject"]["reference"] == "Patient/member-4471829"
    assert plans[0]["title"] == high["title"]
    assert len(search(full, "Goal", subject="Patient/member-4471829")) == len(high["goals"])
    assert len(search(full, "Patient")) == 1  # the payer's member, no copy
    assert full.stats()["statuses"].get("200", 0) >= 1  # the $member-match answer

    # the hospital's casebridge pulls what the payer's API holds: open referrals become intake cases
    hospital = instances("hospital", "mercy-east", eager=True)
    hospital.call("POST", "/partners", 201, json={
        "id": "payer", "name": "Lakeshore Community Health Plan", "kind": "ehr", "base_url": full.base_url,
        "organizations": ["mercy-east"], "direction": "pull", "profile": full.partner_profile})
    hospital.call("POST", "/partners/payer/check", 200)
    hospital.call("POST", "/partners/payer/pull", 202)
    status = hospital.call("GET", "/partners/payer/status", 200).get_json()
    assert status["watermark"] and status["dead_letters"] == 0
    items = hospital.call("GET", "/cases?status=intake", 200).get_json()["items"]
    open_referrals = [s for s in high["services"] if s["kind"] == "referral" and s["status"] in ("requested",)]
    assert len(items) >= len(open_referrals) >= 1
    arrived = items[0]["case"]
    assert arrived["client"]["names"][0]["family"] == "Okafor"
    assert any(i["value"] == "LCH4471829-01" for i in arrived["client"]["identifiers"])


# -- 3. an EHR referral, accepted and completed ------------------------------------------------------------
def test_an_ehr_referral_is_accepted_and_completed_and_the_task_follows(instances, full):
    agency = instances("agency", "riverbend")
    agency.call("POST", "/partners", 201, json={
        "id": "mercy-ehr", "name": "Mercy EHR", "kind": "ehr", "base_url": full.base_url,
        "organizations": ["riverbend"], "receiving_organization": "riverbend", "profile": full.partner_profile})
    agency.call("POST", "/partners/mercy-ehr/check", 200)
    agency.start_worker()

    # the EHR refers its patient: a ServiceRequest and the Task that tracks it
    ehr = requests.Session()
    headers = {"Content-Type": "application/fhir+json"}
    patient = ehr.post(f"{full.base_url}/Patient", headers=headers, timeout=10, json={
        "resourceType": "Patient", "name": [{"family": "Lindqvist", "given": ["Evan"]}], "birthDate": "1994-11-02",
        "identifier": [{"system": "https://mercy.example.org/fhir/sid/mrn", "value": "M-55190"}]}).json()
    referral = ehr.post(f"{full.base_url}/ServiceRequest", headers=headers, timeout=10, json={
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "code": {"text": "Outpatient substance use treatment intake"},
        "subject": {"reference": f"Patient/{patient['id']}"}, "authoredOn": "2024-08-05"}).json()
    task = ehr.post(f"{full.base_url}/Task", headers=headers, timeout=10, json={
        "resourceType": "Task", "status": "requested", "intent": "order",
        "focus": {"reference": f"ServiceRequest/{referral['id']}"},
        "for": {"reference": f"Patient/{patient['id']}"}, "authoredOn": "2024-08-05"}).json()

    # the EHR's Subscription notifies casebridge (id-only)
    agency.call("POST", "/partners/mercy-ehr/notify", 202, json={
        "resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": f"{full.base_url}/ServiceRequest/{referral['id']}",
             "request": {"method": "POST", "url": "ServiceRequest"}, "response": {"status": "201"}}]})
    items = agency.wait(lambda: agency.call("GET", "/cases?status=intake", 200).get_json()["items"],
                        what="the intake case")
    assert len(items) == 1
    case_id, case = items[0]["id"], items[0]["case"]
    assert case["client"]["names"][0]["family"] == "Lindqvist"
    (service,) = case["services"]
    assert service["status"] == "requested"

    def set_status(status: str) -> int:
        current = agency.call("GET", f"/cases/{case_id}", 200)
        services = copy.deepcopy(current.get_json()["services"])
        services[0]["status"] = status
        reply = agency.call("PATCH", f"/cases/{case_id}", 200, json={"status": "active", "services": services},
                            headers={"If-Match": current.headers["ETag"],
                                     "Content-Type": "application/merge-patch+json"})
        return int(reply.headers["ETag"].split('"')[1])

    def task_status(version: int):
        state = synced(agency, case_id, "mercy-ehr")
        if state and state["synced_version"] >= version:
            return requests.get(f"{full.base_url}/Task/{task['id']}", timeout=10).json()
        return None

    version = set_status("accepted")  # the case team accepts the referral
    seen = agency.wait(lambda: task_status(version), what="the accepted status")
    assert seen["status"] == "accepted"
    assert seen["focus"]["reference"] == f"ServiceRequest/{referral['id']}"  # the EHR's own Task, updated

    version = set_status("completed")  # and completes the service
    seen = agency.wait(lambda: task_status(version), what="the completed status")
    assert seen["status"] == "completed"
    assert len(search(full, "Task")) == 1  # no second Task: the EHR's one carries the status
    assert len(search(full, "ServiceRequest")) == 1
