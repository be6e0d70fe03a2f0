"""Keeping partners in step with case records: push through the outbox and the identity ledger,
pull with a watermark, and never lose or duplicate an update. The names of the sync engine that
callers outside it use, gathered from the modules that own them:

- ``service.sync_outbox``: a case save writes an outbox row per partner the case is shared with, in
  the same transaction (``on_case_saved``, a store save hook); ``dispatch`` turns rows into tasks.
- ``service.sync_push``: ``push_case`` holds the case (a lease) and writes what the partner takes of
  it, in bundles (``service.sync_bundled_writes``, ``service.sync_bundles``) or one request per
  resource (``service.sync_single_writes``), idempotent through the ledger.
- ``service.sync_outgoing``: our resources as the partner gets them (references, sync identifier).
- ``service.sync_merge``: an echo of our own write recognised; a three-way merge on a version conflict.
- ``service.sync_pull`` and ``service.sync_inbound``: pull with a ``_lastUpdated`` watermark or on a
  notification, and apply what changed: Task status of our referrals (closed loop), new referrals
  (intake cases), and plans and goals we shared.
- ``service.sync_ledger``: the ledger, sync state, conflicts and dead letters (``record_failure``).
"""
from __future__ import annotations

from adapters.errors import AmbiguousWrite, TransientError
from service.sync_inbound import apply_remote
from service.sync_ledger import ATTEMPTS_KEPT, WRITTEN_VERSIONS_KEPT, record_failure
from service.sync_ledger import update_state as _update_state  # noqa: F401 - tests set a state with it
from service.sync_merge import DERIVED_ELEMENTS, SERVER_ELEMENTS, three_way
from service.sync_outbox import dispatch, on_case_saved, shared_with
from service.sync_outgoing import SYNC_SYSTEM, WRITE_ORDER, body_hash, outgoing
from service.sync_outgoing import ordered as _ordered  # noqa: F401 - bench/sync.py orders resources with it
from service.sync_pull import PULL_TYPES, PullResult, notified_references, notify, partners_to_pull, pull_partner
from service.sync_push import LEASE_SECONDS, CaseBusy, Lease, push_case, take_leases
from service.sync_single_writes import ConflictRecorded, PushResult

__all__ = [
    "on_case_saved", "dispatch", "shared_with",
    "push_case", "take_leases", "Lease", "PushResult", "CaseBusy", "ConflictRecorded", "LEASE_SECONDS",
    "outgoing", "body_hash", "SYNC_SYSTEM", "WRITE_ORDER",
    "three_way", "SERVER_ELEMENTS", "DERIVED_ELEMENTS",
    "pull_partner", "PullResult", "PULL_TYPES", "notify", "notified_references", "partners_to_pull", "apply_remote",
    "record_failure", "ATTEMPTS_KEPT", "WRITTEN_VERSIONS_KEPT",
    "AmbiguousWrite", "TransientError",
]
