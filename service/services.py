"""Use cases. Called by the command line, the HTTP views and the background tasks alike."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from typing import TYPE_CHECKING, Callable, Optional

import orjson
from sqlalchemy.exc import IntegrityError

from mappings import fhir_input, invariants
from mappings.export import BUNDLE_TYPES, DEFAULT_BASE_URL, case_bundle
from mappings.importer import ImportResult, import_graph
from service import exports, schemas
from service.domain import CASE_STATUSES, PROGRAMS, Case, Organization
from service.errors import AlreadyExists, CasebridgeError, Conflict, Invalid, NotFound, Problem, Unprocessable

if TYPE_CHECKING:
    from service.auth import Actor
    from service.store import Store, StoredCase


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


# -- case records ----------------------------------------------------------------------------------
#
# Every use case below takes the ``store`` and the calling ``actor`` and works only on the actor's
# organization: another organization's case is ``NotFound``, exactly as if it did not exist. Records
# are checked with ``schemas.load_case`` and stored in their dumped (normalized) JSON form, so what a
# GET gives back is exactly what was stored. ``expected_version`` is the version an ``If-Match``
# named; ``None`` means ``If-Match: *`` (whatever version is current).

#: a case in this status counts as deleted: it stays in the store, with every version, but lists leave it out
DELETED_STATUS = "entered_in_error"
_RETRIES = 5


def create_case(store: Store, actor: Actor, data: object) -> StoredCase:
    """A new case at version 1; ``AlreadyExists`` (409) when the id is taken."""
    record = _checked_record(actor, data)
    return store.add_case(actor.organization_id, record, actor=actor.key_id)


def get_case(store: Store, actor: Actor, case_id: str) -> StoredCase:
    """The current version of a case (a deleted one too: it is kept with status ``entered_in_error``)."""
    return store.get_case(actor.organization_id, case_id)


def replace_case(store: Store, actor: Actor, case_id: str, data: object,
                 expected_version: Optional[int]) -> StoredCase:
    """The case replaced by ``data`` as a new version; ``Conflict`` (412) when it is no longer at
    ``expected_version``. The record's ``id`` must be ``case_id``."""
    record = _checked_record(actor, data, case_id)
    return _write(store, actor, case_id, expected_version, lambda current: record)


def patch_case(store: Store, actor: Actor, case_id: str, patch: object,
               expected_version: Optional[int]) -> StoredCase:
    """The case with a JSON merge patch (RFC 7386) applied, as a new version. The patched record is
    checked like a whole one (``null`` removes a field; a list is replaced as a whole)."""
    return _write(store, actor, case_id, expected_version,
                  lambda current: _checked_record(actor, merge_patch(current.data, patch), case_id))


def delete_case(store: Store, actor: Actor, case_id: str, expected_version: Optional[int] = None) -> StoredCase:
    """The case marked ``entered_in_error`` as a new version; nothing is erased. A ``closure_reason``
    is dropped from the new version (the rules allow it only on closed or cancelled cases; the
    previous version keeps it). Deleting a deleted case changes nothing and gives it back."""
    def deleted(current: StoredCase) -> Optional[dict]:
        if current.data.get("status") == DELETED_STATUS:
            return None
        data = {k: v for k, v in current.data.items() if k != "closure_reason"}
        return {**data, "status": DELETED_STATUS}
    return _write(store, actor, case_id, expected_version, deleted)


def list_cases(store: Store, actor: Actor, *, status: Optional[str] = None, program: Optional[str] = None,
               identifier: Optional[tuple[Optional[str], str]] = None,
               updated_since: Optional[dt.datetime] = None, cursor: Optional[str] = None,
               limit: int = 50) -> tuple[list[StoredCase], Optional[str]]:
    """One page of the organization's cases, oldest update first, and the cursor of the next page
    (None on the last). Deleted cases are left out unless ``status`` asks for ``entered_in_error``.
    ``identifier`` is a client identifier ``(system, value)``; a system of None matches any."""
    problems = []
    if status is not None and status not in CASE_STATUSES:
        problems.append(Problem("status", f"must be one of: {', '.join(CASE_STATUSES)}"))
    if program is not None and program not in PROGRAMS:
        problems.append(Problem("program", f"must be one of: {', '.join(PROGRAMS)}"))
    after = _read_cursor(cursor, problems) if cursor is not None else None
    if problems:
        raise Invalid("the case search is not valid", problems)
    page = store.list_cases(actor.organization_id, status=status, program=program, identifier=identifier,
                            updated_since=updated_since, after=after, limit=limit + 1,
                            include_deleted=status == DELETED_STATUS)
    if len(page) <= limit:
        return page, None
    page = page[:limit]
    return page, _make_cursor(page[-1])


def case_history(store: Store, actor: Actor, case_id: str) -> list[StoredCase]:
    """Every version of the case, newest first; ``version_action`` tells what each one did."""
    return store.history(actor.organization_id, case_id)


def version_action(stored: StoredCase) -> str:
    """What wrote this version: ``create``, ``update`` or ``delete`` (as the store records it)."""
    if stored.version == 1:
        return "create"
    return "delete" if stored.deleted else "update"


def export_stored_case(store: Store, actor: Actor, case_id: str, bundle_type: str = "collection",
                       base_url: str = DEFAULT_BASE_URL) -> orjson.Fragment:
    """A stored case as a FHIR Bundle whose fullUrls are under ``base_url``, as JSON ready to send
    (``orjson.dumps`` writes it as it is; ``orjson.loads(fragment.contents)`` reads it)."""
    if bundle_type not in BUNDLE_TYPES:
        raise Invalid("unknown bundle type", [Problem("type", f"must be one of: {', '.join(BUNDLE_TYPES)}")])
    version, updated_at = store.case_stamp(actor.organization_id, case_id)
    found = exports.cached_bundle_json(actor.organization_id, case_id, version, updated_at, bundle_type, base_url)
    if found is None:  # not converted since it last changed (or since this process started)
        found = exports.bundle_json(store.get_case(actor.organization_id, case_id), bundle_type, base_url)
    return orjson.Fragment(found)


def import_fhir(store: Store, actor: Actor, raw: bytes | str | dict | list) -> dict:
    """FHIR (a Bundle, a resource or NDJSON) stored as the organization's case records, idempotently.

    A case is matched first by its import claim, then by id: a case with a CarePlan is claimed by
    its id (which the importer derives from the CarePlan's case identifier, else its id), a case
    without one by its client's first identifier (else its id). So the same input twice, or two
    copies at once, gives the same cases and no duplicates. A matched case whose record differs is
    updated (a new version); an equal one is left as it is. Every record is checked before any is
    written. Returns ``{"cases": [{"id", "version", "outcome": created|updated|unchanged}],
    "unmapped": [...], "warnings": [...]}``."""
    entries = fhir_input.parse(raw)
    problems = fhir_input.validate(entries)
    if problems:
        raise Invalid("the input is not valid FHIR R4", problems)
    graph = fhir_input.ResourceGraph(entries)
    groups = fhir_input.group_cases(graph)
    result = import_graph(graph, Organization(id=actor.organization_id))
    records = []
    for index, (group, case) in enumerate(zip(groups, result.cases)):
        try:
            record = _checked_record(actor, schemas.dump_case(case))
        except CasebridgeError as error:
            raise type(error)(f"case {index} ({case.id}) from the input is not a valid case record: {error.message}",
                              [Problem(f"cases.{index}.{p.path}".rstrip("."), p.message) for p in error.problems]) \
                from None
        records.append((record, _import_claim(group, case)))
    outcomes = [_import_one(store, actor, record, claim) for record, claim in records]
    return {
        "cases": [{"id": stored.id, "version": stored.version, "outcome": outcome} for outcome, stored in outcomes],
        "unmapped": [{k: v for k, v in u.items() if k != "resource"} for u in result.unmapped],
        "warnings": [{"path": w.path, "message": w.message} for w in result.warnings],
    }


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# -- helpers ---------------------------------------------------------------------------------------
def _checked_record(actor: Actor, data: object, case_id: Optional[str] = None) -> dict:
    """``data`` as a stored record: a valid case of the actor's organization (and with ``case_id``)."""
    case = schemas.load_case(data)
    problems = []
    if case_id is not None and case.id != case_id:
        problems.append(Problem("id", f"must be {case_id}, the id of the case being written, not {case.id}"))
    if case.organization.id != actor.organization_id:
        problems.append(Problem("organization.id", f"must be {actor.organization_id}, the organization of "
                                                   f"the API key, not {case.organization.id}"))
    if problems:
        raise Unprocessable("the case record does not belong here", problems)
    return schemas.dump_case(case)


def _write(store: Store, actor: Actor, case_id: str, expected_version: Optional[int],
           change: Callable[[StoredCase], Optional[dict]]) -> StoredCase:
    """The case rewritten by ``change`` (which gives None for "leave it as it is"). With an expected
    version a concurrent writer makes it ``Conflict``; with ``*`` it is retried on the newer version."""
    for _ in range(_RETRIES):
        current = store.get_case(actor.organization_id, case_id)
        if expected_version is not None and current.version != expected_version:
            raise Conflict(f"case {case_id} is at version {current.version}, not {expected_version}")
        record = change(current)
        if record is None:
            return current
        try:
            return store.update_case(actor.organization_id, case_id, current.version, record, actor=actor.key_id,
                                     deleted=record["status"] == DELETED_STATUS)
        except Conflict:
            if expected_version is not None:
                raise
    raise Conflict(f"case {case_id} kept changing while it was being written; try again")


def _import_claim(group: fhir_input.CaseGroup, case: Case) -> str:
    if group.careplan is None and case.client.identifiers:
        first = min((i.system, i.value) for i in case.client.identifiers)
        key = f"fhir-import:client:{first[0]}|{first[1]}"
    else:
        key = f"fhir-import:case:{case.id}"
    return key if len(key) <= 200 else "fhir-import:sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _import_one(store: Store, actor: Actor, record: dict, claim: str) -> tuple[str, StoredCase]:
    """One imported record stored: ``(created|updated|unchanged, the case)``. A concurrent import of
    the same case makes the insert or the update fail; the loop then reads what it wrote."""
    org, taken = actor.organization_id, False
    for _ in range(_RETRIES):
        try:
            with store.transaction() as conn:
                case_id = store.claimed_case(org, claim, conn=conn) or record["id"]
                try:
                    current = store.get_case(org, case_id, conn=conn)
                except NotFound:
                    # not add_case(claim=...): that gives back a case a concurrent import created
                    # under the claim as if it were this one, and this record would be lost
                    stored = store.add_case(org, record, actor=actor.key_id, conn=conn)
                    store.add_claim(org, claim, stored.id, conn=conn)
                    return "created", stored
                incoming = {**record, "id": current.id}
                if incoming == current.data:
                    return "unchanged", current
                return "updated", store.update_case(org, current.id, current.version, incoming, actor=actor.key_id,
                                                    deleted=incoming["status"] == DELETED_STATUS, conn=conn)
        except (IntegrityError, Conflict):
            continue
        except AlreadyExists:
            if taken:  # still taken after a fresh read: another organization's case has the id
                raise
            taken = True
    raise Conflict(f"case {record['id']} kept changing while it was being imported; try again")


def _make_cursor(last: StoredCase) -> str:
    token = orjson.dumps([last.updated_at.isoformat(), last.id])
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def _read_cursor(cursor: str, problems: list[Problem]) -> Optional[tuple[dt.datetime, str]]:
    try:
        stamp, last_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = dt.datetime.fromisoformat(stamp)
        if when.tzinfo is None or not isinstance(last_id, str):
            raise ValueError
        return when, last_id
    except (ValueError, TypeError, orjson.JSONDecodeError, binascii.Error):
        problems.append(Problem("cursor", "not a cursor this service gave out; start again without it"))
        return None
