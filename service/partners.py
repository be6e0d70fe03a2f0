"""The partner registry: who casebridge syncs with, how it signs in, what is shared with it.

Secrets (tokens, client secrets, private keys) are stored encrypted (Fernet, key from
``CASEBRIDGE_SECRET_KEY`` or a key file in the instance folder) and never returned.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import threading
from typing import Any, Optional

import orjson
from cryptography.fernet import Fernet, InvalidToken
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import bindparam, delete, insert, select, update

from adapters import auth as partner_auth
from adapters.base import Capabilities, route as plan_route
from adapters.errors import PartnerError, PermanentError
from adapters.fhir_rest import FhirRestEndpoint
from adapters.profiles import PROFILES
from service.config import default_home
from service.errors import AlreadyExists, Invalid, NotFound, Problem
from service.partner_pace import SharedPace
from service.schemas import ID_RE
from service.store import Store, now
from service.sync_store import partner_pace, partners

SECRET_FIELDS = {"token", "client_secret", "private_key"}
AUTH_FIELDS = {
    "none": set(),
    "bearer": {"token"},
    "client_credentials": {"token_url", "client_id", "client_secret"},
    "smart_backend": {"token_url", "client_id", "private_key", "kid"},
}
MIN_PULL_MINUTES = 15
MAX_PULL_MINUTES = 525_600  # a year
#: an id, the whole string (marshmallow's Regexp only anchors at the start)
WHOLE_ID_RE = re.compile(rf"(?:{ID_RE.pattern})\Z")


class AuthSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(sorted(AUTH_FIELDS)))
    token = fields.String()
    token_url = fields.Url(require_tld=False)
    client_id = fields.String()
    client_secret = fields.String()
    scope = fields.String()
    private_key = fields.String()
    kid = fields.String()
    alg = fields.String(validate=validate.OneOf(["RS384", "ES384"]), load_default="RS384")

    @validates_schema
    def _needs(self, data: dict, **_: Any) -> None:
        missing = sorted(AUTH_FIELDS.get(data.get("type"), set()) - set(data))
        if missing:
            raise ValidationError({name: ["required for this auth type"] for name in missing})


class PartnerSchema(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(required=True, validate=validate.Regexp(WHOLE_ID_RE))
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    kind = fields.String(required=True, validate=validate.OneOf(["ehr", "payer"]))
    base_url = fields.Url(required=True, require_tld=False, validate=validate.Length(max=1024))
    auth = fields.Nested(AuthSchema, load_default=lambda: {"type": "none"})
    organizations = fields.List(fields.String(validate=validate.Regexp(WHOLE_ID_RE)), required=True,
                                validate=validate.Length(min=1))
    programs = fields.List(fields.String(), allow_none=True, load_default=None)
    high_risk_only = fields.Boolean(load_default=False)
    direction = fields.String(load_default="both", validate=validate.OneOf(["push", "pull", "both"]))
    pull_every_minutes = fields.Integer(load_default=60,
                                        validate=validate.Range(min=MIN_PULL_MINUTES, max=MAX_PULL_MINUTES))
    rate_limit = fields.Float(allow_none=True, load_default=None, validate=validate.Range(min=0.01))
    profile = fields.String(allow_none=True, load_default=None, validate=validate.OneOf(sorted(PROFILES)))
    quirks = fields.Dict(load_default=dict)
    receiving_organization = fields.String(allow_none=True, load_default=None, validate=validate.Regexp(WHOLE_ID_RE))
    active = fields.Boolean(load_default=True)


_SCHEMA = PartnerSchema()


def _problems(error: ValidationError, prefix: str = "") -> list[Problem]:
    out = []

    def walk(messages: Any, path: str) -> None:
        if isinstance(messages, dict):
            for key, value in messages.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages):
            out.extend(Problem(path, m) for m in messages)
        elif isinstance(messages, list):
            for i, value in enumerate(messages):
                walk(value, f"{path}.{i}")
    walk(error.messages, prefix)
    return out


def _cipher(store: Store) -> Fernet:
    key = os.environ.get("CASEBRIDGE_SECRET_KEY")
    if not key:
        home = default_home()
        path = home / "secret.key"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True)
            path.write_bytes(Fernet.generate_key())
            path.chmod(0o600)
        key = path.read_text().strip()
    return Fernet(key.encode() if isinstance(key, str) else key)


def _public(row: Any) -> dict:
    """A partner as the API shows it: everything but its secrets."""
    auth_public = dict(row.auth_public or {}) if hasattr(row, "auth_public") else {}
    return {
        "id": row.id, "name": row.name, "kind": row.kind, "base_url": row.base_url,
        "auth": {"type": row.auth_type, **auth_public},
        "organizations": row.organizations, "programs": row.programs, "high_risk_only": row.high_risk_only,
        "direction": row.direction, "pull_every_minutes": row.pull_every_minutes, "rate_limit": row.rate_limit,
        "quirks": row.quirks or {}, "receiving_organization": row.receiving_organization, "active": row.active,
        "route": row.route, "watermark": row.watermark,
        "last_pull_at": iso(row.last_pull_at), "last_success_at": iso(row.last_success_at),
    }


def iso(stamp: Optional[dt.datetime]) -> Optional[str]:
    """A stored time as ISO 8601 with its zone (SQLite gives naive datetimes back; every stamp is UTC)."""
    if stamp is None:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).isoformat()


def save_partner(store: Store, data: Any, partner_id: Optional[str] = None, create: bool = False) -> dict:
    """Create (or, with ``partner_id``, replace) a partner; with ``create``, an id already taken is refused
    (409) instead of replaced."""
    if partner_id is not None and isinstance(data, dict):
        data = {**data, "id": partner_id}
    try:
        partner = _SCHEMA.load(data)
    except ValidationError as error:
        raise Invalid("the partner is not valid", _problems(error)) from None
    auth = partner.pop("auth")
    quirks = dict(PROFILES.get(partner.pop("profile") or "", {}))
    quirks.update(partner.pop("quirks"))
    secret = _cipher(store).encrypt(orjson.dumps(auth)).decode()
    values = {**partner, "quirks": quirks, "auth_type": auth["type"], "auth_secret": secret}
    with store.engine.begin() as conn:
        exists = conn.execute(select(partners.c.id).where(partners.c.id == partner["id"])).scalar()
        if exists and create:
            raise AlreadyExists(f"partner {partner['id']} already exists (PUT /partners/{partner['id']} replaces it)")
        if exists:
            conn.execute(update(partners).where(partners.c.id == partner["id"]).values(**values))
        else:
            conn.execute(insert(partners).values(**values, created_at=now()))
    return get_partner(store, partner["id"])


def get_partner(store: Store, partner_id: str) -> dict:
    return _public(_row(store, partner_id)) | {"auth": auth_public(store, partner_id)}


def list_partners(store: Store) -> list[dict]:
    with store.reader.connect() as conn:
        rows = conn.execute(select(partners).order_by(partners.c.id)).all()
    return [_public(r) | {"auth": auth_public(store, r.id)} for r in rows]


def delete_partner(store: Store, partner_id: str) -> None:
    _row(store, partner_id)
    with store.engine.begin() as conn:
        conn.execute(delete(partners).where(partners.c.id == partner_id))
        conn.execute(delete(partner_pace).where(partner_pace.c.partner_id == partner_id))


def auth_settings(store: Store, partner_id: str) -> dict:
    row = _row(store, partner_id)
    try:
        return orjson.loads(_cipher(store).decrypt(row.auth_secret.encode()))
    except InvalidToken:
        raise Invalid("the partner's stored credentials cannot be read with this secret key") from None


def auth_public(store: Store, partner_id: str) -> dict:
    settings = auth_settings(store, partner_id)
    shown = {k: v for k, v in settings.items() if k not in SECRET_FIELDS}
    shown.update({f"has_{k}": True for k in SECRET_FIELDS if k in settings})
    return shown


#: built once, as every push reads it; without what /metadata said (kept for the record, and large to decode)
_PARTNER = select(*[c for c in partners.columns if c.name != "capabilities"]) \
    .where(partners.c.id == bindparam("partner_id"))


def _row(store: Store, partner_id: str) -> Any:
    row = store.lookup(_PARTNER, {"partner_id": partner_id})
    if row is None:
        raise NotFound(f"no partner {partner_id}")
    return row


def partner_row(store: Store, partner_id: str) -> Any:
    return _row(store, partner_id)


def auth_for(settings: dict) -> partner_auth.Auth:
    kind = settings["type"]
    if kind == "bearer":
        return partner_auth.BearerToken(settings["token"])
    if kind == "client_credentials":
        return partner_auth.ClientCredentials(settings["token_url"], settings["client_id"], settings["client_secret"],
                                              settings.get("scope"))
    if kind == "smart_backend":
        return partner_auth.SmartBackendServices(settings["token_url"], settings["client_id"], settings["private_key"],
                                                 settings["kid"], settings.get("alg", "RS384"), settings.get("scope"))
    return partner_auth.NoAuth()


#: endpoints already built, by thread: (database, partner id) -> (the settings they were built from, endpoint)
_ENDPOINTS = threading.local()


def endpoint_for(store: Store, partner_id: str) -> FhirRestEndpoint:
    """The partner's endpoint. Each thread keeps the one it built while the partner's settings stay
    the same, so that one task after another reuses its open connections, its access token and its
    rate limit (and does not decrypt the credentials again); a changed setting builds a new one."""
    row = _row(store, partner_id)
    settings = (row.base_url, row.auth_type, row.auth_secret, row.rate_limit,
                orjson.dumps(row.quirks or {}, option=orjson.OPT_SORT_KEYS))
    built = _ENDPOINTS.__dict__.setdefault("by_partner", {})
    found = built.get((store.url, partner_id))
    if found is not None and found[0] == settings:
        return found[1]
    endpoint = FhirRestEndpoint(row.base_url, auth_for(auth_settings(store, partner_id)), quirks=row.quirks or {},
                                rate_limit=_pace(store, partner_id, row.rate_limit))
    built[(store.url, partner_id)] = (settings, endpoint)
    return endpoint


def _pace(store: Store, partner_id: str, rate: Optional[float]) -> Optional[SharedPace]:
    """The partner's request-rate limit, kept with every other worker process in the database."""
    return SharedPace(store, partner_id, rate) if rate else None


def check_capabilities(store: Store, partner_id: str, endpoint=None) -> dict:
    """Read the partner's /metadata and decide what can be written there (its route). A partner that
    cannot be reached, refuses, or answers something other than a CapabilityStatement: ``PartnerError``."""
    endpoint = endpoint or endpoint_for(store, partner_id)
    try:
        capabilities: Capabilities = endpoint.capabilities()
    except PartnerError:
        raise
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not a usable CapabilityStatement
        raise PermanentError(f"the partner's /metadata is not a usable CapabilityStatement: {error}") from None
    chosen = route_json(plan_route(capabilities), capabilities)
    summary = {"resources": {t: sorted(rc.interactions) for t, rc in sorted(capabilities.resources.items())},
               "system": sorted(capabilities.system_interactions)}
    with store.engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.id == partner_id).values(capabilities=summary, route=chosen))
    return chosen


def route_json(chosen, capabilities: Capabilities) -> dict:
    """A partner's route as stored and shown: what is written there, how, and what is read."""
    ours = set(RESOURCE_TYPES)
    readable = sorted(t for t, rc in capabilities.resources.items()
                      if t in ours and {"read", "search-type"} & rc.interactions)
    return {"mode": chosen.mode.value, "write_method": chosen.write_method.value,
            "writable": sorted(ours & chosen.writable), "readable": readable,
            "conditional_create": sorted(ours & chosen.conditional_create),
            "max_bundle_entries": chosen.max_bundle_entries}


#: the resource types a case record becomes (the rest of a partner's statement does not concern us)
RESOURCE_TYPES = ("Organization", "Practitioner", "Patient", "Condition", "Goal", "ServiceRequest", "Task",
                  "CareTeam", "CarePlan")
