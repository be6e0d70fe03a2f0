"""Case record → FHIR → case record gives back the same record, for any record hypothesis can build."""
from hypothesis import HealthCheck, given, settings

from fhir.resources.R4B.bundle import Bundle
from mappings import fhir_input
from mappings.export import case_bundle
from mappings.importer import import_graph
from mappings.invariants import check_bundle
from service import schemas
from strategies import cases


def import_bundle(bundle: dict):
    entries = fhir_input.parse(bundle)
    assert fhir_input.validate(entries) == []
    return import_graph(fhir_input.ResourceGraph(entries))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_internal_to_fhir_to_internal_is_the_same_record(case):
    for bundle_type in ("collection", "transaction"):
        bundle = case_bundle(case, bundle_type)
        result = import_bundle(bundle)
        assert result.unmapped == [] and result.warnings == []
        assert result.cases == [case]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_output_is_valid_fhir_with_unique_ids_and_resolving_references(case):
    bundle = case_bundle(case)
    Bundle.model_validate(bundle)
    assert check_bundle(bundle) == []
    assert case_bundle(case) == bundle  # deterministic


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_an_imported_record_survives_storage_as_json_and_a_second_round_trip(case):
    first = import_bundle(case_bundle(case)).cases[0]
    stored = schemas.load_case(schemas.dump_case(first))
    assert stored == first
    assert import_bundle(case_bundle(stored)).cases == [stored]
