"""Partner quirks as configuration: what real partners do that their CapabilityStatement does not say.

Each preset is a dict of quirks for ``FhirRestEndpoint(quirks=...)`` / ``Capabilities.with_quirks``; the
partner's live ``/metadata`` is parsed first and the quirks win over it. Keys:

``deny`` / ``allow``            ``{type or "*": [interactions]}`` taken from / added to the statement
``conditional_create``          ``False``: ``If-None-Exist`` is not honoured (a retried POST duplicates)
``conditional_update``          ``False``: no ``PUT Type?search``
``update_create``               ``False``: no PUT with a client-chosen id; the partner assigns ids
``system_deny``/``system_allow`` system interactions (``transaction``, ``batch``) taken away / added
``max_page_size``               most entries a search page returns; ``_count`` is clamped to it
``stale_if_match_status``       409 or 412: what a stale ``If-Match`` gets
``search_session_ttl``          seconds a paged search's next links live
``retry_creates_duplicates``    a POST retried after a lost answer creates a second resource
``update_requires_if_match``    the partner refuses an update without ``If-Match``
``rebase_next_links``           next links name an internal host; rewrite them onto the base URL's host
``max_bundle_entries``          most entries one transaction or batch may hold; more go in several bundles

``*_STATEMENT`` are small CapabilityStatements in the shape of each partner's published one, as far as
the sync engine cares (read/search on the plan, no plan writes), for ``MemoryEndpoint`` and tests.
They are a summary, not a copy: a partner's live statement (and each customer's build of it) decides.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from adapters.base import Capabilities

_PLAN_WRITES = ["create", "update", "patch", "delete"]

EPIC: dict[str, Any] = {
    "name": "epic",
    # Published statement: CarePlan and Goal are read/search only for a backend client.
    "deny": {"CarePlan": _PLAN_WRITES, "Goal": _PLAN_WRITES},
    "conditional_create": False,
    "conditional_update": False,
    "update_create": False,
    # Search pages hold at most 100 entries, and the paging session behind next links expires.
    "max_page_size": 100,
    # Not published; a planning figure. Finish paging well within it (search() restarts once if not).
    "search_session_ttl": 300,
    "stale_if_match_status": 412,
    "retry_creates_duplicates": True,
}

ORACLE: dict[str, Any] = {
    "name": "oracle",
    "deny": {"CarePlan": _PLAN_WRITES, "Goal": _PLAN_WRITES},
    "conditional_create": False,
    "conditional_update": False,
    "update_create": False,
    # Batch is offered, transaction is not: entries succeed or fail one by one.
    "system_deny": ["transaction"],
    # A stale If-Match is answered 409 Conflict, not 412 Precondition Failed.
    "stale_if_match_status": 409,
    "update_requires_if_match": True,
    "retry_creates_duplicates": True,
}

FULL: dict[str, Any] = {
    "name": "full",
    # A full FHIR server (HAPI, our own test server): everything the statement says, nothing taken away.
    "conditional_create": True,
    "conditional_update": True,
    "update_create": True,
    "stale_if_match_status": 412,
    "retry_creates_duplicates": False,  # conditional create makes a retried POST find the first one
}


def capability_statement(
    resources: Mapping[str, Iterable[str]],
    *,
    system: Iterable[str] = (),
    conditional: bool = False,
    update_create: bool = False,
    operations: Mapping[str, Iterable[str]] | None = None,
    software: str = "casebridge test double",
) -> dict[str, Any]:
    """A small R4 CapabilityStatement: ``{"CarePlan": ["read", "search-type"], ...}``."""
    ops = operations or {}
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-01-01",
        "kind": "instance",
        "software": {"name": software},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": rtype,
                        "interaction": [{"code": code} for code in interactions],
                        "conditionalCreate": conditional,
                        "conditionalUpdate": conditional,
                        "updateCreate": update_create,
                        "searchParam": [
                            {"name": n, "type": t}
                            for n, t in (("_id", "token"), ("_lastUpdated", "date"), ("identifier", "token"), ("patient", "reference"))
                        ],
                        **(
                            {"operation": [{"name": n, "definition": f"http://example.org/OperationDefinition/{n}"} for n in ops[rtype]]}
                            if rtype in ops
                            else {}
                        ),
                    }
                    for rtype, interactions in resources.items()
                ],
                "interaction": [{"code": code} for code in system],
            }
        ],
    }


_READ = ["read", "vread", "search-type"]
_RW = _READ + ["create", "update"]
_ALL = _RW + ["patch", "delete", "history-instance", "history-type"]

EPIC_STATEMENT = capability_statement(
    {
        "Patient": _READ,
        "CarePlan": _READ,
        "Goal": _READ,
        "Condition": _READ + ["create"],
        # Referrals are exchanged: a ServiceRequest and the Task that tracks it can be written.
        "ServiceRequest": _READ + ["create", "update"],
        "Task": _READ + ["create", "update"],
        "Coverage": _READ,
    },
    software="Epic-like",
)

ORACLE_STATEMENT = capability_statement(
    {
        "Patient": _READ + ["create", "update", "patch"],
        "CarePlan": _READ,
        "Goal": _READ,
        "Condition": _READ + ["create", "update", "patch"],
        "ServiceRequest": _READ + ["create", "update"],
        "Task": _READ + ["create", "update"],
        "Coverage": _READ,
    },
    system=["batch"],
    software="Oracle-Health-like",
)

FULL_STATEMENT = capability_statement(
    {
        rtype: _ALL
        for rtype in (
            "Patient", "CarePlan", "Goal", "ServiceRequest", "Condition", "Task", "CareTeam",
            "Organization", "Practitioner", "PractitionerRole", "RelatedPerson", "Coverage", "Consent",
            "Provenance", "Observation", "Encounter",
        )
    },
    system=["transaction", "batch", "search-system", "history-system"],
    conditional=True,
    update_create=True,
    operations={"Patient": ["member-match"]},
    software="full FHIR server",
)

MEDPLUM: dict[str, Any] = {
    **FULL,
    "name": "medplum",
    # Medplum's FHIR router runs a transaction holding a conditional create (If-None-Exist) in strict
    # isolation, and refuses such a transaction of more than 8 entries (400, "Transaction requires strict
    # isolation but has too many entries"): a case's changes go in transactions of at most 8.
    "max_bundle_entries": 8,
}

#: Quirks by preset name: what a partner record's ``profile`` field selects.
PROFILES: dict[str, dict[str, Any]] = {"epic": EPIC, "oracle": ORACLE, "full": FULL, "medplum": MEDPLUM}
#: The statement each preset's partner publishes, in summary.
STATEMENTS: dict[str, dict[str, Any]] = {"epic": EPIC_STATEMENT, "oracle": ORACLE_STATEMENT, "full": FULL_STATEMENT,
                                         "medplum": FULL_STATEMENT}


def capabilities(name: str, **overrides: Any) -> Capabilities:
    """The capabilities a preset describes (its statement with its quirks), plus any ``overrides`` quirks."""
    name = name.lower()
    return Capabilities.from_capability_statement(STATEMENTS[name], {**PROFILES[name], **overrides})
