"""Index the identifiers of the stored ServiceRequests, for ServiceRequest?identifier=.

From this revision on, a case save writes an ``identifier`` token for each identifier of each of the
case's ServiceRequests (``service.fhir_index.search_values``): a referral is found by the referrer's
own identifier, and an EHR that sends a referral again can name it in If-None-Exist. The cases saved
before have none. This writes them, and nothing else, for the cases that have a ServiceRequest and no
ServiceRequest identifier token yet, worked out from the case record alone (no full conversion):

* a ServiceRequest is a service of the record; its id is the partner's (``service.fhir.id``) or
  the deterministic one (``mappings.ids.resource_id``), as ``mappings.export.CaseIds`` has it;
* its identifiers are the record's own (``service`` system, the service's id) with what the partner
  sent put back (``service.fhir.patch``, ``mappings.residual.merge``), as ``mappings.export`` has them.

The tokens written here are exactly those a save writes: tests/unit/test_service_request_identifier_tokens.py
compares the two over records entered, imported and published, and
tests/integration/test_service_request_identifier.py runs the migration on SQLite and PostgreSQL. Only
the cases that need it are read, a batch at a time: 100,000 cases, 80,000 of them with services
(420,000 tokens), take about 10 seconds on SQLite and 15 on PostgreSQL. Downgrading takes the tokens
out again (revision 0004's code neither writes nor reads them).

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import orjson
from alembic import op
from sqlalchemy import column, select, table
from sqlalchemy.engine import Connection

from mappings import ids
from mappings.residual import merge

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BATCH = 500  # cases read at once

# the tables as revision 0004 left them (only the columns used here)
cases = table("cases", column("id"), column("organization_id"), column("data"))
fhir_resources = table("fhir_resources", column("resource_type"), column("case_id"))
fhir_tokens = table("fhir_tokens", column("resource_type"), column("resource_id"), column("case_id"),
                    column("organization_id"), column("param"), column("system"), column("code"))

_REQUEST = "ServiceRequest"
_PARAM = "identifier"


def service_request_identifiers(data: dict) -> Iterator[tuple[str, list[tuple[Optional[str], str]]]]:
    """(resource id, its identifier tokens as (system, value)) of each ServiceRequest of a stored case
    record (the JSON ``service.schemas.dump_case`` writes)."""
    case_id = data["id"]
    for service in data.get("services") or ():
        extras = service.get("fhir") or {}
        request_id = extras["id"] if "id" in extras else ids.resource_id(_REQUEST, case_id, service["id"])
        resource = {"identifier": [{"system": ids.SID_SERVICE, "value": service["id"]}]}
        if extras.get("patch"):
            resource = merge(resource, extras["patch"])
        tokens = [(i.get("system"), i["value"]) for i in resource.get("identifier") or () if i.get("value")]
        yield request_id, list(dict.fromkeys(tokens))


def _needing(conn: Connection) -> list[str]:
    """The cases with a ServiceRequest and no ServiceRequest identifier token, in id order."""
    with_requests = {row[0] for row in conn.execute(
        select(fhir_resources.c.case_id).where(fhir_resources.c.resource_type == _REQUEST).distinct())}
    indexed = {row[0] for row in conn.execute(
        select(fhir_tokens.c.case_id).where(fhir_tokens.c.resource_type == _REQUEST,
                                            fhir_tokens.c.param == _PARAM).distinct())}
    return sorted(with_requests - indexed)


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _token_rows(conn: Connection, case_ids: list[str]) -> list[dict]:
    """The identifier token rows of these cases' ServiceRequests."""
    out: list[dict] = []
    for case_id, org, data in conn.execute(select(cases.c.id, cases.c.organization_id, cases.c.data)
                                           .where(cases.c.id.in_(case_ids))):
        seen: set[str] = set()
        for request_id, tokens in service_request_identifiers(orjson.loads(data)):
            if request_id in seen:  # once, as the save hook writes it
                continue
            seen.add(request_id)
            out += [{"resource_type": _REQUEST, "resource_id": request_id, "case_id": case_id,
                     "organization_id": org, "param": _PARAM, "system": system or None, "code": value[:255]}
                    for system, value in tokens]
    return out


def upgrade() -> None:
    conn = op.get_bind()
    insert = fhir_tokens.insert()
    for batch in _batches(_needing(conn), BATCH):
        rows = _token_rows(conn, batch)
        if rows:
            conn.execute(insert, rows)


def downgrade() -> None:
    op.get_bind().execute(fhir_tokens.delete().where(fhir_tokens.c.resource_type == _REQUEST,
                                                     fhir_tokens.c.param == _PARAM))
