"""``GET /fhir/metadata`` against the app itself. What the CapabilityStatement should say is worked out
again, without reading it, from the app's routes and from requests over the Flask test client, and the
two are compared exactly: the resource types; each type's interactions and their flags (conditional
create, update, read and delete, update as create, versioning, older versions); its search parameters
(names and types); its _include and _revinclude values; the system interactions; the operations. A
claim the app does not keep fails, and so does anything the app serves that the statement leaves out.

A probe is served when a sensible request succeeds (2xx) and does what the interaction means (a search
parameter that filters, an _include that includes); it is not served when the app refuses it (4xx) or
ignores it. No probe may answer 5xx. The candidates come from R4 (the resource types of fhir.resources,
the search parameter and operation names below), never from the statement.
"""
from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import pytest
from fhir.resources.R4B import fhirtypes, get_fhir_model_class
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
NONE = "zz-none"            # a value nothing on the server has
NO_DATE = "1000-01-01"      # a date nothing on the server has
FAR_FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"

#: R4 search parameters (hl7.org/fhir/R4/searchparameter-registry.html): the candidates probed
R4_COMMON_PARAMS = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_text", "_content",
                    "_list", "_has", "_type", "_query", "_filter")
R4_PARAMS = {
    "Patient": ("active", "address", "address-city", "address-country", "address-postalcode", "address-state",
                "address-use", "birthdate", "death-date", "deceased", "email", "family", "gender",
                "general-practitioner", "given", "identifier", "language", "link", "name", "organization",
                "phone", "phonetic", "telecom"),
    "CarePlan": ("activity-code", "activity-date", "activity-reference", "based-on", "care-team", "category",
                 "condition", "date", "encounter", "goal", "identifier", "instantiates-canonical",
                 "instantiates-uri", "intent", "part-of", "patient", "performer", "replaces", "status", "subject"),
    "Goal": ("achievement-status", "category", "identifier", "lifecycle-status", "patient", "start-date",
             "subject", "target-date"),
    "ServiceRequest": ("authored", "based-on", "body-site", "category", "code", "encounter", "identifier",
                       "instantiates-canonical", "instantiates-uri", "intent", "occurrence", "patient",
                       "performer", "performer-type", "priority", "replaces", "requester", "requisition",
                       "specimen", "status", "subject"),
    "Condition": ("abatement-age", "abatement-date", "abatement-string", "asserter", "body-site", "category",
                  "clinical-status", "code", "encounter", "evidence", "evidence-detail", "identifier",
                  "onset-age", "onset-date", "onset-info", "patient", "recorded-date", "severity", "stage",
                  "subject", "verification-status"),
    "Task": ("authored-on", "based-on", "business-status", "code", "encounter", "focus", "group-identifier",
             "identifier", "intent", "modified", "owner", "part-of", "patient", "performer", "period", "priority",
             "requester", "status", "subject"),
    "AuditEvent": ("action", "address", "agent", "agent-name", "agent-role", "altid", "date", "entity",
                   "entity-name", "entity-role", "entity-type", "outcome", "patient", "policy", "site", "source",
                   "subtype", "type"),
}
#: R4 operations (hl7.org/fhir/R4/operationslist.html) a server of these types might serve
R4_OPERATIONS = ("everything", "validate", "meta", "meta-add", "meta-delete", "expand", "lookup", "translate",
                 "document", "summary", "graphql", "convert", "export", "match", "apply", "lastn", "stats")
SYSTEM_INTERACTIONS = ("transaction", "batch", "search-system", "history-system")
TYPE_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create",
                     "search-type")


def r4_resource_types() -> list[str]:
    names = []
    for attr in dir(fhirtypes):
        if not (attr.endswith("Type") and attr[:1].isupper()):
            continue
        try:
            model = get_fhir_model_class(attr[:-4])
        except ValueError:
            continue
        if isinstance(model, type) and issubclass(model, Resource) and model.__name__ == attr[:-4] \
                and attr[:-4] not in ("Resource", "DomainResource"):
            names.append(attr[:-4])
    return sorted(names)


# -- the probes ----------------------------------------------------------------------------------
class Probe:
    """Requests with a key that holds every scope; a 5xx is a bug, so it fails at once."""

    def __init__(self, app, headers: dict):
        self.app, self.client, self.headers = app, app.test_client(), headers

    def call(self, method: str, url: str, json_body=None, headers: Optional[dict] = None, data=None):
        response = self.client.open(url, method=method, json=json_body, data=data,
                                    headers={**self.headers, **(headers or {})})
        assert response.status_code < 500, f"{method} {url}: {response.status_code} {response.get_data(as_text=True)}"
        return response

    def ok(self, method: str, url: str, **kwargs) -> bool:
        return 200 <= self.call(method, url, **kwargs).status_code < 300

    def search(self, rtype: str, params: list[tuple[str, str]]):
        """(status, the matches' ids, the included (type, id)s) of a search."""
        response = self.call("GET", f"/fhir/{rtype}?{urlencode(params + [('_count', '500')])}")
        if response.status_code != 200:
            return response.status_code, [], []
        entries = response.json.get("entry", ())
        return (200, [e["resource"]["id"] for e in entries if e.get("search", {}).get("mode", "match") == "match"],
                [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries
                 if e.get("search", {}).get("mode") == "include"])


def references(value) -> set[str]:
    """Every relative reference (Type/id) in a resource."""
    found: set[str] = set()
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.count("/") == 1 and not ref.startswith(("urn:", "#")):
            found.add(ref)
        for item in value.values():
            found |= references(item)
    elif isinstance(value, list):
        for item in value:
            found |= references(item)
    return found


def stripped(resource: dict) -> dict:
    """A copy to post as a new resource: no id, meta or identifier (which names what it copies)."""
    return {k: copy.deepcopy(v) for k, v in resource.items() if k not in ("id", "meta", "identifier")}


@dataclass
class Served:
    """What the app serves, as the statement should say it (see ``stated``)."""
    system: list[str] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    resources: dict[str, dict] = field(default_factory=dict)


class Derive:
    """What the app serves, from its routes and from probes; ``everything`` runs them all, writes last."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.samples: dict[str, list[dict]] = {}

    # -- resource types ---------------------------------------------------------------------------
    def routed_types(self) -> list[str]:
        """The R4 types some /fhir route takes (a wrong method still shows the route is there)."""
        adapter = self.probe.app.url_map.bind("testserver")
        found = []
        for rtype in r4_resource_types():
            for path in (f"/fhir/{rtype}", f"/fhir/{rtype}/{NONE}"):
                try:
                    adapter.match(path, method="GET")
                except MethodNotAllowed:
                    pass
                except NotFound:
                    continue
                found.append(rtype)
                break
        return found

    # -- interactions and their flags -------------------------------------------------------------
    def new_bodies(self, rtype: str) -> list[dict]:
        """Resources a client could post: a copy of one served, and for some types a smaller one."""
        bodies = [stripped(r) for r in self.samples[rtype][:1]]
        if rtype == "Task":  # a ServiceRequest has one Task: point the copy at one that has none
            focused = {(t.get("focus") or {}).get("reference") for t in self.samples["Task"]}
            free = [s["id"] for s in self.samples.get("ServiceRequest", ())
                    if f"ServiceRequest/{s['id']}" not in focused]
            bodies = [{**b, "focus": {"reference": f"ServiceRequest/{free[0]}"}} for b in bodies] if free else bodies
        if rtype == "CarePlan":  # the smallest plan, for a patient of the server
            bodies.append({"resourceType": "CarePlan", "status": "draft", "intent": "plan",
                           "subject": self.samples["CarePlan"][0]["subject"]})
        return bodies

    def interactions(self, rtype: str) -> dict:
        p, sample = self.probe, self.samples[rtype][0]
        rid, url = sample["id"], f"/fhir/{rtype}/{sample['id']}"
        version = (sample.get("meta") or {}).get("versionId") or "1"
        read = p.call("GET", url)
        served = {
            "search-type": True,  # the samples came from it
            "read": read.status_code == 200 and read.json.get("id") == rid,
            "vread": p.ok("GET", f"{url}/_history/{version}"),
            "history-instance": self.is_history(f"{url}/_history"),
            "history-type": self.is_history(f"/fhir/{rtype}/_history"),
        }
        created = [b for b in self.new_bodies(rtype)
                   if p.call("POST", f"/fhir/{rtype}", json_body=b).status_code == 201]
        served["create"] = bool(created)
        current = p.call("GET", url).json if served["read"] else sample
        served["update"] = p.ok("PUT", url, json_body=current)
        served["patch"] = p.ok("PATCH", url, data=json.dumps([{"op": "test", "path": "/id", "value": rid}]),
                               headers={"Content-Type": "application/json-patch+json"})
        flags = {"conditionalCreate": False}
        if created:  # If-None-Exist naming the sample gives the sample back
            again = p.call("POST", f"/fhir/{rtype}", json_body=created[0], headers={"If-None-Exist": f"_id={rid}"})
            flags["conditionalCreate"] = again.status_code == 200 and again.json.get("id") == rid
        new_id = str(uuid.uuid4())
        flags["updateCreate"] = p.call("PUT", f"/fhir/{rtype}/{new_id}", json_body={**current, "id": new_id}
                                       ).status_code == 201
        flags["conditionalUpdate"] = p.ok("PUT", f"/fhir/{rtype}?_id={rid}", json_body=current)
        flags["conditionalRead"] = self.conditional_read(url, read)
        flags["versioning"] = self.versioning(url, served["update"])
        flags["readHistory"] = self.reads_older_versions(url, served["read"] and served["vread"])
        # single or multiple would need a further probe: a statement claiming either fails until it is written
        flags["conditionalDelete"] = ("single or multiple" if p.ok("DELETE", f"/fhir/{rtype}?_id={NONE}")
                                      else "not-supported")
        served["delete"] = p.ok("DELETE", url)  # last: it may take the sample away
        return {"interactions": sorted(k for k, v in served.items() if v), **flags}

    def is_history(self, url: str) -> bool:
        response = self.probe.call("GET", url)
        return response.status_code == 200 and response.json.get("type") == "history"

    def conditional_read(self, url: str, read) -> str:
        etag = read.headers.get("ETag")
        not_match = bool(etag) and self.probe.call("GET", url, headers={"If-None-Match": etag}).status_code == 304
        since = self.probe.call("GET", url, headers={"If-Modified-Since": FAR_FUTURE}).status_code == 304
        return {(True, True): "full-support", (True, False): "not-match", (False, True): "modified-since",
                (False, False): "not-supported"}[(not_match, since)]

    def versioning(self, url: str, updates: bool) -> str:
        current = self.probe.call("GET", url)
        version = (current.json.get("meta") or {}).get("versionId") if current.status_code == 200 else None
        if version is None:
            return "no-version"
        if updates:
            stale = self.probe.call("PUT", url, json_body=current.json,
                                    headers={"If-Match": f'W/"{int(version) + 99}"'})
            if stale.status_code == 412:
                return "versioned-update"
        return "versioned"

    def reads_older_versions(self, url: str, can: bool) -> bool:
        if not can:
            return False
        version = int(self.probe.call("GET", url).json["meta"]["versionId"])
        return version > 1 and self.probe.ok("GET", f"{url}/_history/{version - 1}")

    # -- search parameters ------------------------------------------------------------------------
    def filters(self, rtype: str, name: str) -> bool:
        """Served when some value that matches nothing leaves no match; not served when the app
        refuses the name (400) or ignores it (every match still there)."""
        before = len(self.probe.search(rtype, [])[1])
        assert before, f"nothing to search in {rtype}"
        outcomes = [self.probe.search(rtype, [(name, value)]) for value in (NONE, NO_DATE)]
        if any(status == 200 and not found for status, found, _ in outcomes):
            return True
        assert all(status == 400 or len(found) >= before for status, found, _ in outcomes), (rtype, name, outcomes)
        return False

    def param_type(self, rtype: str, name: str, refs: list[str]) -> str:
        s = self.probe.search
        if s(rtype, [(name, f"ge{NO_DATE}")])[0] == 200 and s(rtype, [(name, NONE)])[0] == 400:
            return "date"
        status, found, _ = s(rtype, [(f"{name}:contains", NONE)])
        if status == 200 and not found:
            return "string"
        for ref in refs:  # Type/id finds what the bare id finds
            by_ref = s(rtype, [(name, ref)])
            if by_ref[0] == 200 and by_ref[1] and sorted(s(rtype, [(name, ref.split("/")[1])])[1]) == sorted(by_ref[1]):
                return "reference"
        if all(s(rtype, [(name, value)])[:2] == (200, []) for value in (f"{NONE}|{NONE}", f"|{NONE}")):
            return "token"
        return "a type these probes do not tell"

    def search_params(self, rtype: str, refs: list[str]) -> dict[str, str]:
        names = dict.fromkeys([*R4_COMMON_PARAMS, *R4_PARAMS.get(rtype, ())])
        served = [name for name in names if self.filters(rtype, name)]
        return {name: self.param_type(rtype, name, refs) for name in served}

    def includes(self, rtype: str, params: dict[str, str], types: list[str]) -> list[str]:
        candidates = ["*", f"{rtype}:*", *(f"{rtype}:{name}" for name in params),
                      *(f"{rtype}:{name}:{target}" for name, kind in params.items() if kind == "reference"
                        for target in types)]
        return sorted(c for c in candidates if self.probe.search(rtype, [("_include", c)])[2])

    def revincludes(self, rtype: str, params_of: dict[str, dict[str, str]]) -> list[str]:
        candidates = ["*", *(f"{source}:{name}" for source, params in params_of.items() for name in params)]
        found = []
        for candidate in candidates:
            included = self.probe.search(rtype, [("_revinclude", candidate)])[2]
            if any(candidate == "*" or t == candidate.split(":")[0] for t, _ in included):
                found.append(candidate)
        return sorted(found)

    # -- the server -------------------------------------------------------------------------------
    def system_interactions(self) -> list[str]:
        patient = self.samples["Patient"][0]["id"]
        p, found = self.probe, []
        for kind in ("transaction", "batch"):
            response = p.call("POST", "/fhir", json_body={"resourceType": "Bundle", "type": kind, "entry": [
                {"request": {"method": "GET", "url": f"Patient/{patient}"}}]})
            if response.status_code == 200 and response.json.get("type") == f"{kind}-response":
                found.append(kind)
        response = p.call("GET", f"/fhir?_id={patient}")
        if response.status_code == 200 and response.json.get("type") == "searchset":
            found.append("search-system")
        response = p.call("GET", "/fhir/_history")
        if response.status_code == 200 and response.json.get("type") == "history":
            found.append("history-system")
        return sorted(found)

    def operation_names(self) -> list[str]:
        """The R4 operations, and any $name a route takes."""
        routed = {part[1:] for rule in self.probe.app.url_map.iter_rules() for part in rule.rule.split("/")
                  if part.startswith("$")}
        return sorted(set(R4_OPERATIONS) | routed)

    def operations(self, prefix: str) -> list[str]:
        served = []
        for name in self.operation_names():
            url = f"{prefix}/${name}"
            if self.probe.ok("GET", url) or self.probe.ok("POST", url, json_body={"resourceType": "Parameters"}):
                served.append(name)
        return served

    def everything(self) -> Served:
        types = self.routed_types()
        for rtype in types:
            status, _, _ = self.probe.search(rtype, [])
            assert status == 200, f"no search of {rtype} to find a resource to probe with"
            self.samples[rtype] = [e["resource"] for e in self.probe.call(
                "GET", f"/fhir/{rtype}?_count=500").json.get("entry", ())]
            assert self.samples[rtype], f"no {rtype} to probe with"
        refs = sorted({ref for rs in self.samples.values() for r in rs for ref in references(r)}
                      | {f"{rtype}/{r['id']}" for rtype, rs in self.samples.items() for r in rs[:3]})
        params_of = {rtype: self.search_params(rtype, refs) for rtype in types}
        served = Served(system=self.system_interactions(), operations=self.operations("/fhir"))
        for rtype in types:
            served.resources[rtype] = {
                "searchParam": params_of[rtype],
                "searchInclude": self.includes(rtype, params_of[rtype], types),
                "searchRevInclude": self.revincludes(rtype, params_of),
                "operation": sorted(set(self.operations(f"/fhir/{rtype}"))
                                    | set(self.operations(f"/fhir/{rtype}/{self.samples[rtype][0]['id']}"))),
            }
        for rtype in types:  # last: these write
            served.resources[rtype].update(self.interactions(rtype))
        return served


FLAGS = ("versioning", "readHistory", "updateCreate", "conditionalCreate", "conditionalRead", "conditionalUpdate",
         "conditionalDelete")


def stated(statement: dict) -> Served:
    """The statement in the shape of ``Served``; every flag must be stated, not left to a default."""
    rest = statement["rest"]
    assert len(rest) == 1 and rest[0]["mode"] == "server"
    rest = rest[0]
    out = Served(system=sorted(i["code"] for i in rest.get("interaction", ())),
                 operations=sorted(o["name"] for o in rest.get("operation", ())))
    for resource in rest["resource"]:
        assert resource["type"] not in out.resources, f"{resource['type']} is stated twice"
        missing = [f for f in FLAGS if f not in resource]
        assert not missing, f"{resource['type']} leaves {missing} unstated"
        names = [p["name"] for p in resource.get("searchParam", ())]
        assert len(names) == len(set(names)), f"{resource['type']} states a search parameter twice"
        out.resources[resource["type"]] = {
            "interactions": sorted(i["code"] for i in resource.get("interaction", ())),
            **{f: resource[f] for f in FLAGS},
            "searchParam": {p["name"]: p["type"] for p in resource.get("searchParam", ())},
            "searchInclude": sorted(resource.get("searchInclude", ())),
            "searchRevInclude": sorted(resource.get("searchRevInclude", ())),
            "operation": sorted(o["name"] for o in resource.get("operation", ())),
        }
    return out


# -- fixtures --------------------------------------------------------------------------------------
def case_json(name: str, org: str) -> dict:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data["organization"] = {**data["organization"], "id": org}
    return data


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The app (one, for every test here) with two cases, the statement it serves, and what it serves."""
    from service import auth, create_app

    home = tmp_path_factory.mktemp("capabilities")
    app = create_app({"database_url": f"sqlite:///{home / 'casebridge.db'}", "base_url": "http://testserver",
                      "home": home})
    store = app.extensions["casebridge"].store
    for name in ("realistic", "discharge"):
        store.add_case("org-1", case_json(name, "org-1"))
    headers = {"Authorization": f"Bearer {auth.create_key(store, 'org-1', ['admin'])}"}
    client = app.test_client()
    for url in ("/fhir/Patient", "/fhir/CarePlan"):  # something in the audit trail, with entities
        for entry in client.get(url, headers=headers).json["entry"]:
            client.get(f"{url}/{entry['resource']['id']}", headers=headers)
    response = client.get("/fhir/metadata")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json, stated(response.json), Derive(Probe(app, headers)).everything()


# -- the statement ---------------------------------------------------------------------------------
def test_statement_is_valid_r4(probed):
    statement, _, _ = probed
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    assert statement["implementation"]["url"] == "http://testserver/fhir"


def test_resource_types_are_those_served(probed):
    _, claimed, served = probed
    assert sorted(claimed.resources) == sorted(served.resources)


@pytest.mark.parametrize("part", ["interactions", *FLAGS])
def test_each_types_interactions_and_their_flags(probed, part):
    _, claimed, served = probed
    assert {t: r[part] for t, r in claimed.resources.items()} == {t: r[part] for t, r in served.resources.items()}


def test_each_types_search_parameters_names_and_types(probed):
    _, claimed, served = probed
    assert {t: r["searchParam"] for t, r in claimed.resources.items()} == \
        {t: r["searchParam"] for t, r in served.resources.items()}


@pytest.mark.parametrize("part", ["searchInclude", "searchRevInclude"])
def test_each_types_include_and_revinclude(probed, part):
    _, claimed, served = probed
    assert {t: r[part] for t, r in claimed.resources.items()} == {t: r[part] for t, r in served.resources.items()}


def test_system_interactions_and_operations(probed):
    statement, claimed, served = probed
    assert claimed.system == served.system
    assert claimed.operations == served.operations
    assert {t: r["operation"] for t, r in claimed.resources.items()} == \
        {t: r["operation"] for t, r in served.resources.items()}
    for resource in statement["rest"][0]["resource"]:  # each names the R4 definition of its type's operation
        for operation in resource.get("operation", ()):
            assert operation["definition"] == \
                f"http://hl7.org/fhir/OperationDefinition/{resource['type']}-{operation['name']}"
