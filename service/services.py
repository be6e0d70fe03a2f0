"""Use cases. Called by the command line, the HTTP views and the background tasks alike."""
from __future__ import annotations

from typing import Optional

from mappings import fhir_input, invariants
from mappings.export import BUNDLE_TYPES, case_bundle
from mappings.importer import ImportResult, import_graph
from service import schemas
from service.domain import Case, Organization
from service.errors import CasebridgeError, Invalid, Problem


def convert_to_fhir(case_json: object, bundle_type: str = "collection", validate: bool = False) -> dict:
    """A case record (JSON) as a FHIR Bundle."""
    if bundle_type not in BUNDLE_TYPES:
        raise Invalid("unknown bundle type", [Problem("bundle_type", f"must be one of {', '.join(BUNDLE_TYPES)}")])
    case = schemas.load_case(case_json)
    bundle = case_bundle(case, bundle_type)
    if validate:
        check_output(bundle)
    return bundle


def check_output(bundle: dict) -> None:
    """Our own output failing FHIR validation or our invariants is a bug, not bad input."""
    problems = fhir_input.validate(fhir_input.parse(bundle)) + invariants.check_bundle(bundle)
    if problems:
        raise CasebridgeError("the FHIR produced for this case is not valid", problems)


def read_fhir(raw: bytes | str | dict | list, organization: Optional[Organization] = None) -> ImportResult:
    """FHIR input (a resource, a Bundle of any type, or NDJSON), validated, as case records."""
    entries = fhir_input.parse(raw)
    problems = fhir_input.validate(entries)
    if problems:
        raise Invalid("the input is not valid FHIR R4", problems)
    return import_graph(fhir_input.ResourceGraph(entries), organization)


def convert_from_fhir(raw: bytes | str | dict | list, validate: bool = False) -> dict:
    """FHIR input as case records (JSON), with what was not part of any record listed beside them."""
    result = read_fhir(raw)
    cases = [schemas.dump_case(case) for case in result.cases]
    if validate:
        for case_json in cases:
            schemas.load_case(case_json)
    return {
        "cases": cases,
        "unmapped": [{k: v for k, v in u.items() if k != "resource"} | {"resource": u["resource"]}
                     for u in result.unmapped],
        "warnings": [{"path": w.path, "message": w.message} for w in result.warnings],
    }


def export_case(case: Case, bundle_type: str = "collection") -> dict:
    return case_bundle(case, bundle_type)
