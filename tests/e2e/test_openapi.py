"""openapi.yaml against the app: the document is valid OpenAPI 3.1, it names exactly the routes the app
has, and what the app answers to generated requests is what the document says (schemathesis, in
process over WSGI).

The generated requests carry a key holding every scope. Before each operation's run the example case of
docs/case-record.md (the document's example body for POST /cases) is stored, so the example ids the
document gives for paths (that case's id and the ids of the FHIR resources it converts to) name
resources that exist, and the examples phase reads real data rather than only 404s.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

pytestmark = pytest.mark.e2e

OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
ALL_SCOPES = ("cases:read", "cases:write", "fhir:read", "fhir:write", "admin")
#: What the app must satisfy on every generated request: never a 5xx, a status code the document lists for
#: the operation, the content type it lists for that status, and a body that its schema accepts.
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
]
#: Bounded and deterministic: the explicit examples, then 25 generated requests per operation (valid and
#: invalid ones) from a fixed seed. The coverage phase (boundary values of every parameter) would multiply
#: the run time several times over; the stateful phase needs links the document does not declare.
MAX_EXAMPLES = 25
#: for a write asked for ``Prefer: return=minimal``, which the document says is answered with no body
BODYLESS_CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance]
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20240304,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
})


def _spec() -> dict:
    return yaml.safe_load(OPENAPI.read_text())


def test_openapi_document_is_valid_openapi_3_1():
    from openapi_spec_validator import OpenAPIV31SpecValidator, validate

    spec = _spec()
    assert spec["openapi"].startswith("3.1")
    validate(spec, cls=OpenAPIV31SpecValidator)


# -- the document names exactly the app's routes ------------------------------------------------------

_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def app_operations(app) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route, Flask's ``<id>`` / ``<path:x>`` written ``{id}`` / ``{x}``;
    without ``static``, HEAD and OPTIONS (Flask adds those itself)."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method, _CONVERTER.sub(r"{\1}", rule.rule)))
    return out


def document_operations(spec: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in HTTP_METHODS}


def _shape(template: str) -> str:
    """A template with its parameter names erased: ``/cases/{id}`` and ``/cases/{case_id}`` are one route."""
    return _PLACEHOLDER.sub("{}", template)


def _unmatched(app, documented: set[tuple[str, str]]) -> tuple[set, set]:
    """Documented operations no route serves, and routes no documented operation reaches.

    Exact templates first; what is left is matched by asking the app's own URL map, so that a generic
    route such as ``/fhir/<type>/<id>`` is reached by the documented ``/fhir/Patient/{id}``, ``/fhir/Goal/{id}``,
    ... (each documented placeholder must land in a route's converter, never on a literal segment)."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound
    from werkzeug.routing import RequestRedirect

    routes = app_operations(app)
    by_shape = {(m, _shape(p)): (m, p) for m, p in routes}
    reached = set()
    missing_routes = set()
    adapter = app.url_map.bind("testserver")
    for method, path in documented:
        exact = by_shape.get((method, _shape(path)))
        if exact is not None:
            reached.add(exact)
            continue
        names = _PLACEHOLDER.findall(path)
        values = {name: f"zq{i}x" for i, name in enumerate(names)}
        concrete = _PLACEHOLDER.sub(lambda m: values[m.group(1)], path)
        try:
            rule, args = adapter.match(concrete, method=method, return_rule=True)
        except (NotFound, MethodNotAllowed, RequestRedirect):
            missing_routes.add((method, path))
            continue
        if not all(any(v in str(a) for a in args.values()) for v in values.values()):
            missing_routes.add((method, path))  # a placeholder where the route has a literal segment
            continue
        reached.add((method, _CONVERTER.sub(r"{\1}", rule.rule)))
    return missing_routes, routes - reached


def test_openapi_names_exactly_the_routes_of_the_app(app):
    not_served, undocumented = _unmatched(app, document_operations(_spec()))
    problems = [f"route missing from openapi.yaml: {m} {p}" for m, p in sorted(undocumented, key=lambda o: o[::-1])]
    problems += [f"openapi.yaml names a route the app does not have: {m} {p}"
                 for m, p in sorted(not_served, key=lambda o: o[::-1])]
    assert not problems, "\n".join(problems)


def test_the_route_comparison_sees_missing_and_extra_routes():
    """The comparison itself: a route dropped from the document, and one the app lacks, are both caught."""
    from flask import Flask

    toy = Flask("toy")
    toy.add_url_rule("/things/<thing_id>", "thing", lambda thing_id: "", methods=["GET", "PUT"])
    toy.add_url_rule("/r/<kind>/<path:rest>", "generic", lambda kind, rest: "")
    documented = {("GET", "/things/{id}"), ("GET", "/r/A/{rest}"), ("GET", "/gone"), ("POST", "/things/{id}")}
    not_served, undocumented = _unmatched(toy, documented)
    assert undocumented == {("PUT", "/things/{thing_id}")}
    assert not_served == {("GET", "/gone"), ("POST", "/things/{id}")}


# -- the app answers as documented --------------------------------------------------------------------


def _example_case(spec: dict) -> dict:
    return spec["paths"]["/cases"]["post"]["requestBody"]["content"]["application/json"]["example"]


@pytest.fixture
def api_headers(app, make_key) -> dict:
    """A key with every scope, in the example case's organization, and that case stored."""
    case = _example_case(_spec())
    headers = make_key(ALL_SCOPES, organization=case["organization"]["id"])
    response = app.test_client().post("/cases", json=case, headers=headers)
    if response.status_code != 201:
        pytest.fail(f"storing the example case failed: POST /cases answered {response.status_code} "
                    f"{response.get_data(as_text=True)[:500]}")
    return headers


schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)

_ORGANIZATION = _example_case(_spec())["organization"]["id"]
_CASE_BODIES = {("POST", "/cases"), ("PUT", "/cases/{id}"), ("POST", "/convert/to-fhir")}
_LISTS = ("needs", "goals", "services", "notes", "care_team")


@schema.hook
def map_case(context, case):
    """Generated case records that also keep the case rules the schema cannot state (unique ids, references
    that resolve, the key's organization), so that creates and replaces get through to the store and the FHIR index instead
    of stopping at 422; a replaced case keeps the id of its path. Records generated to be invalid are
    left alone."""
    if (case.method.upper(), case.path) in _CASE_BODIES and isinstance(case.body, dict):
        _keep_case_rules(case.body)
        if isinstance(case.body.get("organization"), dict):
            case.body["organization"]["id"] = _ORGANIZATION  # the key's own (another is refused, 422)
        if case.path == "/cases/{id}" and case.path_parameters and "id" in case.body:
            case.body["id"] = case.path_parameters["id"]
    return case


def _keep_case_rules(record: dict) -> None:
    ids = {}
    for name in _LISTS:
        items = record.get(name)
        if isinstance(items, list):
            seen, kept = set(), []
            for item in items:
                key = item.get("id") if isinstance(item, dict) else None
                if isinstance(key, str) and key in seen:
                    continue
                seen.add(key)
                kept.append(item)
            record[name] = kept
            ids[name] = seen
    for goal in record.get("goals") or ():
        if isinstance(goal, dict):
            if isinstance(goal.get("addresses"), list):
                goal["addresses"] = [ref for ref in goal["addresses"] if ref in ids.get("needs", ())]
            if goal.get("status") not in ("achieved", "not_achieved"):
                goal.pop("achieved_date", None)
    for service in record.get("services") or ():
        if isinstance(service, dict):
            for name, target in (("goals", "goals"), ("needs", "needs")):
                if isinstance(service.get(name), list):
                    service[name] = [ref for ref in service[name] if ref in ids.get(target, ())]
    if record.get("status") not in ("closed", "cancelled"):
        record.pop("closure_reason", None)
    if record.get("opened") and record.get("closed"):
        record.pop("closed")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_app_answers_as_documented(case, app, api_headers):
    # in process over WSGI (schemathesis.pytest.from_fixture, the lazy loader, does not run on pytest 9)
    response = case.call(app=app, headers=api_headers)
    minimal = (case.headers or {}).get("Prefer") == "return=minimal" and response.status_code < 300
    case.validate_response(response, checks=BODYLESS_CHECKS if minimal and not response.content else CHECKS)
