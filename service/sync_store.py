"""Storage for partner sync: the partner registry, the outbox, the identity ledger, per-case sync
state, conflicts and dead letters. Same metadata (and migrations) as ``service.store``."""
from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Index, Integer, String, Table, Text

from service.store import metadata

partners = Table(
    "partners", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # ehr | payer
    Column("base_url", String(1024), nullable=False),
    Column("auth_type", String(32), nullable=False),  # none | bearer | client_credentials | smart_backend
    Column("auth_secret", Text),  # encrypted JSON of the auth settings
    Column("organizations", JSON, nullable=False),  # ids of the organizations whose cases are shared
    Column("programs", JSON),  # programs shared (null: every program)
    Column("high_risk_only", Boolean, nullable=False, default=False),
    Column("direction", String(8), nullable=False),  # push | pull | both
    Column("pull_every_minutes", Integer, nullable=False, default=60),
    Column("rate_limit", Float),  # requests per second
    Column("quirks", JSON),  # partner behaviour known beyond its CapabilityStatement
    Column("receiving_organization", String(64)),  # whose intake cases inbound referrals become
    Column("capabilities", JSON),  # what /metadata said, as read at the last check
    Column("route", JSON),
    Column("watermark", String(40)),
    Column("last_pull_at", DateTime(timezone=True)),
    Column("last_success_at", DateTime(timezone=True)),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: when a rate-limited partner may next be sent a request (seconds since the epoch): one pace kept by
#: every worker process on every machine together (``service.partner_pace``)
partner_pace = Table(
    "partner_pace", metadata,
    Column("partner_id", String(64), primary_key=True),
    Column("next_at", Float, nullable=False),
)

#: written in the same transaction as the case change; the dispatcher turns rows into tasks
outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("case_id", String(64), nullable=False),
    Column("partner_id", String(64), nullable=False),
    Column("case_version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("dispatched_at", DateTime(timezone=True)),
    Index("ix_outbox_pending", "dispatched_at", "id"),
)

#: which partner resource each of our resources is, and what we last sent it
ledger = Table(
    "ledger", metadata,
    Column("partner_id", String(64), primary_key=True),
    Column("resource_type", String(32), primary_key=True),
    Column("local_id", String(64), primary_key=True),
    Column("remote_id", String(128), nullable=False),
    Column("remote_version", String(64)),
    Column("sent_hash", String(64)),
    Column("sent", JSON),  # the body last synced (for three-way comparison on a conflict)
    Column("written_versions", JSON),  # the partner's version ids of our own recent writes (echoes on a pull)
    Column("attempts", JSON),  # bodies we sent lately, answered or not (a lost answer's write is still ours)
    Column("case_id", String(64), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_ledger_remote", "partner_id", "resource_type", "remote_id"),
)

sync_state = Table(
    "sync_state", metadata,
    Column("case_id", String(64), primary_key=True),
    Column("partner_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # pending | synced | failed | conflict | unmatched
    Column("wanted_version", Integer, nullable=False, default=0),
    Column("synced_version", Integer, nullable=False, default=0),
    Column("member_id", String(128)),  # a payer's member identifier, from $member-match
    Column("last_error", Text),
    Column("lease", String(32)),  # the push holding the case for this partner, and until when
    Column("lease_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

conflicts = Table(
    "conflicts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("case_id", String(64), nullable=False, index=True),
    Column("partner_id", String(64), nullable=False),
    Column("resource_type", String(32), nullable=False),
    Column("local_id", String(64), nullable=False),
    Column("fields", JSON, nullable=False),  # element names both sides changed
    Column("ours", JSON),
    Column("theirs", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
)

dead_letters = Table(
    "dead_letters", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("partner_id", String(64), nullable=False, index=True),
    Column("case_id", String(64)),
    Column("case_version", Integer),
    Column("operation", String(32), nullable=False),  # push | pull | notify
    Column("status", Integer),
    Column("error", Text, nullable=False),
    Column("outcome", JSON),  # the partner's OperationOutcome
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("replayed_at", DateTime(timezone=True)),
)
