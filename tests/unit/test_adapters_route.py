"""Capabilities parsed from partner CapabilityStatements, quirks on top, and what route() decides."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters import profiles
from adapters.base import (
    PLAN_TYPES,
    Capabilities,
    RouteMode,
    WriteMethod,
    route,
)

# Shaped like Epic's published R4 statement for a backend app: read and search on the plan, a few
# creates elsewhere, no conditional create, no system interactions.
EPIC_LIKE = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2024-05-01",
    "publisher": "Epic",
    "kind": "instance",
    "software": {"name": "Epic", "version": "May 2024"},
    "implementation": {"description": "FHIR R4 endpoint", "url": "https://ehr.example.org/api/FHIR/R4"},
    "fhirVersion": "4.0.1",
    "format": ["json", "xml"],
    "rest": [
        {
            "mode": "server",
            "security": {
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": "https://ehr.example.org/oauth2/token"}],
                    }
                ],
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
            },
            "resource": [
                {"type": "Patient", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [{"name": "identifier", "type": "token"}, {"name": "birthdate", "type": "date"}]},
                {"type": "CarePlan", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [{"name": "patient", "type": "reference"}, {"name": "category", "type": "token"}]},
                {"type": "Goal", "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [{"name": "patient", "type": "reference"}]},
                {"type": "Condition", "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "create"}]},
                {"type": "ServiceRequest", "interaction": [{"code": "read"}, {"code": "search-type"}]},
                {"type": "Task", "interaction": [{"code": "read"}, {"code": "search-type"}]},
            ],
        }
    ],
}

# Shaped like Oracle Health's (Millennium) R4 statement: batch but not transaction, updates on some types.
ORACLE_LIKE = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2024-04-10",
    "publisher": "Oracle Health",
    "kind": "instance",
    "software": {"name": "Millennium", "version": "2024.04"},
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [
        {
            "mode": "server",
            "interaction": [{"code": "batch"}],
            "resource": [
                {"type": "Patient", "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "create"},
                                                   {"code": "update"}, {"code": "patch"}],
                 "versioning": "versioned-update", "readHistory": False, "updateCreate": False},
                {"type": "CarePlan", "interaction": [{"code": "read"}, {"code": "search-type"}]},
                {"type": "Goal", "interaction": [{"code": "read"}, {"code": "search-type"}]},
                {"type": "Condition", "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "create"},
                                                     {"code": "update"}]},
                {"type": "ServiceRequest", "interaction": [{"code": "read"}, {"code": "search-type"}]},
            ],
        }
    ],
}

FULL_LIKE = profiles.capability_statement(
    {t: ["read", "search-type", "create", "update"] for t in (*PLAN_TYPES, "Task", "CareTeam")},
    system=["transaction", "batch"],
    conditional=True,
    update_create=True,
    operations={"Patient": ["member-match"]},
)


def test_epic_like_statement_parses_plan_as_read_only():
    caps = Capabilities.from_capability_statement(EPIC_LIKE, profiles.EPIC)
    assert caps.supports("CarePlan", "read") and caps.supports("CarePlan", "search-type")
    assert not caps.can_write("CarePlan") and not caps.can_write("Goal")
    assert caps.can_create("Condition")
    assert not caps.conditional_create("Condition")  # conditionalCreate absent means false
    assert caps.system_interactions == frozenset()
    assert caps.max_page_size == 100 and caps.search_session_ttl == 300
    assert caps.fhir_version == "4.0.1"
    assert caps.resource("Patient").search_params == {"identifier", "birthdate"}
    assert caps.quirks["retry_creates_duplicates"] is True


def test_epic_routes_pull_only_with_single_requests():
    decided = route(Capabilities.from_capability_statement(EPIC_LIKE, profiles.EPIC))
    assert decided.mode is RouteMode.PULL_ONLY
    assert decided.writable == frozenset()
    assert decided.write_method is WriteMethod.SINGLE


def test_epic_build_that_accepts_referrals_routes_referral_only():
    quirks = {**profiles.EPIC, "allow": {"ServiceRequest": ["create"], "Task": ["create", "update"]}}
    decided = route(Capabilities.from_capability_statement(EPIC_LIKE, quirks))
    assert decided.mode is RouteMode.REFERRAL_ONLY
    assert decided.writable == {"ServiceRequest", "Task"}
    assert not decided.can_write("CarePlan") and not decided.can_write("Condition")
    assert decided.conditional_create == frozenset()


def test_oracle_like_statement_has_batch_not_transaction_and_answers_409():
    caps = Capabilities.from_capability_statement(ORACLE_LIKE, profiles.ORACLE)
    assert caps.supports_system("batch") and not caps.supports_system("transaction")
    assert caps.stale_if_match_status == 409
    assert caps.supports("Patient", "update") and not caps.resource("Patient").update_create
    decided = route(caps)
    assert decided.write_method is WriteMethod.BATCH
    assert decided.mode is RouteMode.PULL_ONLY  # CarePlan, Goal, ServiceRequest are not writable


def test_oracle_quirk_removes_transaction_even_if_the_statement_claims_it():
    statement = copy.deepcopy(ORACLE_LIKE)
    statement["rest"][0]["interaction"].append({"code": "transaction"})
    caps = Capabilities.from_capability_statement(statement, profiles.ORACLE)
    assert route(caps).write_method is WriteMethod.BATCH


def test_full_server_routes_full_plan_as_transaction():
    caps = Capabilities.from_capability_statement(FULL_LIKE, profiles.FULL)
    decided = route(caps)
    assert decided.mode is RouteMode.FULL_PLAN
    assert decided.write_method is WriteMethod.TRANSACTION
    assert set(PLAN_TYPES) | {"Task", "CareTeam"} == decided.writable
    assert decided.conditional_create == decided.writable
    assert decided.client_ids == decided.writable
    assert caps.supports_operation("Patient", "$member-match")
    assert not caps.supports_operation("Patient", "everything")


def test_quirk_deny_takes_a_full_server_down_to_referral_only():
    quirks = {"deny": {"CarePlan": ["create", "update"], "Goal": ["create", "update"]}}
    decided = route(Capabilities.from_capability_statement(FULL_LIKE, quirks))
    assert decided.mode is RouteMode.REFERRAL_ONLY
    assert decided.writable == {"ServiceRequest", "Task"}
    assert decided.write_method is WriteMethod.TRANSACTION


def test_update_only_types_count_as_writable_only_with_update_create():
    types = {t: ["read", "update"] for t in PLAN_TYPES}
    assert route(Capabilities.build(types)).mode is RouteMode.PULL_ONLY
    decided = route(Capabilities.build(types, update_create=True))
    assert decided.mode is RouteMode.FULL_PLAN
    assert decided.client_ids == set(PLAN_TYPES)


def test_no_batch_no_transaction_means_single_requests():
    caps = Capabilities.build({t: ["create"] for t in PLAN_TYPES}, system=["search-system"])
    assert route(caps).write_method is WriteMethod.SINGLE


def test_statement_with_a_client_rest_part_only_offers_nothing():
    statement = {"resourceType": "CapabilityStatement", "rest": [
        {"mode": "client", "resource": [{"type": "CarePlan", "interaction": [{"code": "create"}]}]}]}
    caps = Capabilities.from_capability_statement(statement)
    assert not caps.can_write("CarePlan")


def test_not_a_capability_statement_is_refused():
    with pytest.raises(ValueError):
        Capabilities.from_capability_statement({"resourceType": "OperationOutcome"})


def test_stale_if_match_status_must_be_409_or_412():
    with pytest.raises(ValueError):
        Capabilities.build({}, quirks={"stale_if_match_status": 400})


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_profile_statement_parses_and_keeps_the_plan_readable(name):
    caps = profiles.capabilities(name)
    for rtype in ("Patient", "CarePlan", "Goal"):
        assert caps.supports(rtype, "read") and caps.supports(rtype, "search-type")
    assert caps.quirks["name"] == name


def test_profile_presets_encode_the_documented_behaviour():
    epic = route(profiles.capabilities("epic"))
    assert epic.mode is RouteMode.REFERRAL_ONLY and epic.write_method is WriteMethod.SINGLE
    assert epic.writable == {"ServiceRequest", "Task"} and not epic.conditional_create
    oracle = profiles.capabilities("oracle")
    assert route(oracle).mode is RouteMode.REFERRAL_ONLY
    assert route(oracle).write_method is WriteMethod.BATCH and oracle.stale_if_match_status == 409
    assert route(profiles.capabilities("full")).mode is RouteMode.FULL_PLAN
    assert profiles.capabilities("full", max_page_size=20).max_page_size == 20
    assert set(profiles.PROFILES) == set(profiles.STATEMENTS) == {"epic", "oracle", "full", "medplum"}
    assert profiles.PROFILES["epic"]["max_page_size"] == 100  # a partner record's quirks start from these
    medplum = route(profiles.capabilities("medplum"))
    assert medplum.write_method is WriteMethod.TRANSACTION and medplum.max_bundle_entries == 8
    assert route(profiles.capabilities("full")).max_bundle_entries is None


@pytest.mark.parametrize("cap", [0, -1, 2.5, "8", True])
def test_a_bundle_cap_is_a_whole_number_of_at_least_one(cap):
    with pytest.raises(ValueError):
        route(profiles.capabilities("full", max_bundle_entries=cap))


_TYPES = (*PLAN_TYPES, "Task", "CareTeam")
_INTERACTIONS = ("read", "search-type", "create", "update", "patch")


@given(
    st.dictionaries(st.sampled_from(_TYPES), st.sets(st.sampled_from(_INTERACTIONS))),
    st.sets(st.sampled_from(("transaction", "batch"))),
    st.booleans(),
)
def test_route_never_writes_what_the_partner_cannot_take(resources, system, update_create):
    caps = Capabilities.build(resources, system=sorted(system), update_create=update_create)
    decided = route(caps)
    assert all(caps.can_create(t) for t in decided.writable)
    assert (decided.mode is RouteMode.FULL_PLAN) == all(caps.can_create(t) for t in PLAN_TYPES)
    if decided.mode is RouteMode.PULL_ONLY:
        assert decided.writable == frozenset()
    expected = "transaction" if "transaction" in system else "batch" if "batch" in system else "single"
    assert decided.write_method.value == expected
