"""The partner registry and sync surfaces (JSON; errors as ``application/problem+json``).

Partners are the organization's administrators' business (``admin`` scope); a partner's own
notifications come in with a key holding ``fhir:write``. Routes:

- ``GET /partners``, ``POST /partners`` (201), ``GET|PUT|DELETE /partners/<id>``: the registry;
  secrets are accepted but never returned.
- ``POST /partners/<id>/check``: read the partner's ``/metadata`` and decide its route.
- ``GET /partners/<id>/status``: backlog, last success, watermark, dead-letter count, route.
- ``POST /partners/<id>/pull``: pull now (202).
- ``POST /partners/<id>/notify``: a FHIR Subscription rest-hook notification, id-only (202).
- ``GET /dead-letters?partner=``, ``POST /dead-letters/<id>/replay`` (202).
- ``GET /cases/<id>/sync``: the case's sync status with each partner, with the partner's ids.
- ``GET /conflicts?case=&open=true``, ``POST /conflicts/<id>/resolve``.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from adapters.errors import PartnerError
from service import actor, audit, runtime, sync_admin
from service import partners as registry
from service.api.body import read_json
from service.errors import NotFound, PartnerUnavailable, Problem, Unprocessable

bp = Blueprint("partners", __name__)

ADMIN = "admin"
JSON_TYPES = ("application/json",)
NOTIFY_TYPES = ("application/json", "application/fhir+json")
#: ids of dead letters and conflicts are 32-bit (larger numbers are no row: 404, not a database error)
ROW_ID = "int(max=2147483647)"


def _visible(who, partner_id: str) -> dict:
    """A partner the caller's organization shares cases with; any other answers 404, as if absent."""
    partner = registry.get_partner(runtime().store, partner_id)
    if who.organization_id not in partner["organizations"]:
        raise NotFound(f"no partner {partner_id}")
    return partner


def _own_organizations_only(who, data) -> None:
    """Through the API an organization shares its own cases only (an operator's command line may
    register a partner for several)."""
    if isinstance(data, dict) and data.get("organizations") != [who.organization_id]:
        raise Unprocessable("a partner registered here shares this organization's cases only",
                            [Problem("organizations", f"must be [\"{who.organization_id}\"]")])


@bp.get("/partners")
def list_partners():
    who = actor(ADMIN)
    return jsonify(items=[p for p in registry.list_partners(runtime().store)
                          if who.organization_id in p["organizations"]])


@bp.post("/partners")
def create_partner():
    who = actor(ADMIN)
    data = read_json(JSON_TYPES)
    _own_organizations_only(who, data)
    partner = registry.save_partner(runtime().store, data, create=True)
    response = jsonify(partner)
    response.status_code = 201
    response.headers["Location"] = f"/partners/{partner['id']}"
    return response


@bp.get("/partners/<partner_id>")
def get_partner(partner_id: str):
    return jsonify(_visible(actor(ADMIN), partner_id))


@bp.put("/partners/<partner_id>")
def replace_partner(partner_id: str):
    who = actor(ADMIN)
    _visible(who, partner_id)
    data = read_json(JSON_TYPES)
    _own_organizations_only(who, data)
    return jsonify(registry.save_partner(runtime().store, data, partner_id))


@bp.delete("/partners/<partner_id>")
def delete_partner(partner_id: str):
    _visible(actor(ADMIN), partner_id)
    registry.delete_partner(runtime().store, partner_id)
    return "", 204


@bp.post("/partners/<partner_id>/check")
def check_partner(partner_id: str):
    _visible(actor(ADMIN), partner_id)
    store = runtime().store
    try:
        return jsonify(route=registry.check_capabilities(store, partner_id))
    except PartnerError as error:
        raise PartnerUnavailable(f"the partner could not be reached or did not answer with a usable "
                                 f"CapabilityStatement: {error}") from None


@bp.get("/partners/<partner_id>/status")
def partner_status(partner_id: str):
    _visible(actor(ADMIN), partner_id)
    return jsonify(sync_admin.partner_status(runtime().store, partner_id))


@bp.post("/partners/<partner_id>/pull")
def pull_now(partner_id: str):
    _visible(actor(ADMIN), partner_id)
    sync_admin.enqueue_pull(partner_id)
    return jsonify(status="queued"), 202


@bp.post("/partners/<partner_id>/notify")
def notify(partner_id: str):
    _visible(actor("fhir:write"), partner_id)
    references = sync_admin.accept_notification(partner_id, read_json(NOTIFY_TYPES))
    return jsonify(status="queued", resources=references), 202


@bp.get("/dead-letters")
def dead_letters():
    who = actor(ADMIN)
    mine = {p["id"] for p in registry.list_partners(runtime().store) if who.organization_id in p["organizations"]}
    return jsonify(items=[d for d in sync_admin.dead_letters(runtime().store, request.args.get("partner"))
                          if d["partner"] in mine])


@bp.post(f"/dead-letters/<{ROW_ID}:letter_id>/replay")
def replay(letter_id: int):
    who = actor(ADMIN)
    letter = next((d for d in sync_admin.dead_letters(runtime().store) if d["id"] == letter_id), None)
    if letter is not None:
        _visible(who, letter["partner"])
    return jsonify(sync_admin.replay(runtime().store, letter_id)), 202


@bp.get("/cases/<case_id>/sync")
def case_sync(case_id: str):
    who = actor("cases:read")
    audit.note(audit.CASE, case_id)
    return jsonify(sync_admin.case_sync_status(runtime().store, who, case_id))


@bp.get("/conflicts")
def list_conflicts():
    who = actor("cases:read")
    only_open = request.args.get("open", "true").lower() != "false"
    return jsonify(items=sync_admin.conflicts_of(runtime().store, who, request.args.get("case"), only_open))


@bp.post(f"/conflicts/<{ROW_ID}:conflict_id>/resolve")
def resolve_conflict(conflict_id: int):
    who = actor("cases:write")
    return jsonify(sync_admin.resolve_conflict(runtime().store, who, conflict_id))
