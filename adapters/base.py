"""The partner port: what the sync engine may ask of a hospital EHR or payer system, and what it can do.

``PartnerEndpoint`` is the port (``fhir_rest.FhirRestEndpoint`` speaks FHIR R4 REST, ``memory.MemoryEndpoint``
is the fake for tests of everything else). ``Capabilities`` is what a partner offers, parsed from its
CapabilityStatement and corrected by configuration (``profiles``); ``route()`` turns that into what the sync
engine should write there and how.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from adapters.errors import SearchExpired

SearchParams = Mapping[str, "str | Sequence[str]"]

INTERACTIONS = frozenset(
    {"read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"}
)
WRITE_INTERACTIONS = frozenset({"create", "update", "patch", "delete"})
SYSTEM_INTERACTIONS = frozenset({"transaction", "batch", "search-system", "history-system"})

#: Quirk keys that ``Capabilities`` understands; any other key is kept in ``Capabilities.quirks``.
CAPABILITY_QUIRKS = frozenset(
    {
        "max_page_size",
        "stale_if_match_status",
        "search_session_ttl",
        "deny",
        "allow",
        "conditional_create",
        "conditional_update",
        "update_create",
        "system_deny",
        "system_allow",
    }
)


class Versioned(NamedTuple):
    """A resource as the partner holds it, with the version to send back in ``If-Match``."""

    resource: dict[str, Any]
    id: str | None
    version_id: str | None
    etag: str | None


@dataclass(frozen=True)
class Page:
    """One page of a search: the resources (match and include entries), the opaque next link, the total."""

    resources: list[dict[str, Any]]
    next: str | None = None
    total: int | None = None
    bundle: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ResourceCapability:
    """What a partner allows on one resource type."""

    interactions: frozenset[str] = frozenset()
    conditional_create: bool = False
    conditional_update: bool = False
    update_create: bool = False
    search_params: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Capabilities:
    """What a partner offers, from its CapabilityStatement with configured quirks applied on top.

    ``max_page_size``: the most entries per search page the partner returns (``_count`` is clamped to it).
    ``stale_if_match_status``: what the partner answers a stale ``If-Match`` with (409 or 412).
    ``search_session_ttl``: seconds a paged search's next links stay valid, when the partner expires them.
    ``quirks``: every configured key, including ones only other layers read (e.g. ``retry_creates_duplicates``).
    """

    resources: Mapping[str, ResourceCapability] = field(default_factory=dict)
    system_interactions: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()
    max_page_size: int | None = None
    stale_if_match_status: int = 412
    search_session_ttl: float | None = None
    fhir_version: str | None = None
    quirks: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stale_if_match_status not in (409, 412):
            raise ValueError(f"stale_if_match_status must be 409 or 412, not {self.stale_if_match_status!r}")
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))
        object.__setattr__(self, "quirks", MappingProxyType(dict(self.quirks)))

    # --- questions ---------------------------------------------------------------------------------

    def resource(self, resource_type: str) -> ResourceCapability:
        return self.resources.get(resource_type, ResourceCapability())

    def supports(self, resource_type: str, interaction: str) -> bool:
        return interaction in self.resource(resource_type).interactions

    def can_create(self, resource_type: str) -> bool:
        """A new resource of this type can be written: by POST, or by PUT with our id (update-as-create)."""
        rc = self.resource(resource_type)
        return "create" in rc.interactions or ("update" in rc.interactions and rc.update_create)

    def can_write(self, resource_type: str) -> bool:
        return bool(self.resource(resource_type).interactions & WRITE_INTERACTIONS)

    def conditional_create(self, resource_type: str) -> bool:
        rc = self.resource(resource_type)
        return "create" in rc.interactions and rc.conditional_create

    def conditional_update(self, resource_type: str) -> bool:
        rc = self.resource(resource_type)
        return "update" in rc.interactions and rc.conditional_update

    def supports_system(self, interaction: str) -> bool:
        return interaction in self.system_interactions

    def supports_operation(self, resource_type: str | None, name: str) -> bool:
        name = name.lstrip("$")
        if resource_type is not None and name in self.resource(resource_type).operations:
            return True
        return name in self.operations

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_capability_statement(
        cls, statement: Mapping[str, Any], quirks: Mapping[str, Any] | None = None
    ) -> Capabilities:
        """Parse the server part of an R4 CapabilityStatement, then apply ``quirks`` (see ``profiles``)."""
        if statement.get("resourceType") != "CapabilityStatement":
            raise ValueError(f"not a CapabilityStatement: {statement.get('resourceType')!r}")
        rests = [r for r in statement.get("rest") or [] if r.get("mode", "server") == "server"]
        resources: dict[str, ResourceCapability] = {}
        system: set[str] = set()
        operations: set[str] = set()
        for rest in rests:
            system |= {i.get("code") for i in rest.get("interaction") or [] if i.get("code")}
            operations |= _operation_names(rest.get("operation"))
            for entry in rest.get("resource") or []:
                rtype = entry.get("type")
                if not rtype:
                    continue
                resources[rtype] = ResourceCapability(
                    interactions=frozenset(
                        i.get("code") for i in entry.get("interaction") or [] if i.get("code") in INTERACTIONS
                    ),
                    # conditionalCreate/Update default to false (R4 CapabilityStatement.rest.resource)
                    conditional_create=bool(entry.get("conditionalCreate", False)),
                    conditional_update=bool(entry.get("conditionalUpdate", False)),
                    update_create=bool(entry.get("updateCreate", False)),
                    search_params=frozenset(p.get("name") for p in entry.get("searchParam") or [] if p.get("name")),
                    operations=frozenset(_operation_names(entry.get("operation"))),
                )
        base = cls(
            resources=resources,
            system_interactions=frozenset(system & SYSTEM_INTERACTIONS),
            operations=frozenset(operations),
            fhir_version=statement.get("fhirVersion"),
        )
        return base.with_quirks(quirks or {})

    @classmethod
    def build(
        cls,
        resources: Mapping[str, Sequence[str]],
        *,
        system: Sequence[str] = (),
        conditional: bool = False,
        update_create: bool = False,
        operations: Sequence[str] = (),
        quirks: Mapping[str, Any] | None = None,
    ) -> Capabilities:
        """Capabilities written out by hand: ``{"CarePlan": ["read", "search-type"], ...}``."""
        caps = cls(
            resources={
                t: ResourceCapability(
                    interactions=frozenset(i),
                    conditional_create=conditional,
                    conditional_update=conditional,
                    update_create=update_create,
                )
                for t, i in resources.items()
            },
            system_interactions=frozenset(system),
            operations=frozenset(o.lstrip("$") for o in operations),
        )
        return caps.with_quirks(quirks or {})

    def with_quirks(self, quirks: Mapping[str, Any]) -> Capabilities:
        """These capabilities corrected by configuration; quirks win over the statement.

        ``deny`` / ``allow``: ``{type or "*": [interactions]}`` removed from / added to what the statement says.
        ``conditional_create`` / ``conditional_update`` / ``update_create``: ``bool`` for every type.
        ``system_deny`` / ``system_allow``: system interactions (``transaction``, ``batch``) removed / added.
        ``max_page_size``, ``stale_if_match_status``, ``search_session_ttl``: as the fields.
        """
        deny = quirks.get("deny") or {}
        allow = quirks.get("allow") or {}
        resources = dict(self.resources)
        for rtype in set(allow) - {"*"}:
            resources.setdefault(rtype, ResourceCapability())
        for rtype, rc in list(resources.items()):
            interactions = set(rc.interactions)
            interactions |= set(allow.get("*", ())) | set(allow.get(rtype, ()))
            interactions -= set(deny.get("*", ())) | set(deny.get(rtype, ()))
            resources[rtype] = ResourceCapability(
                interactions=frozenset(interactions),
                conditional_create=quirks.get("conditional_create", rc.conditional_create),
                conditional_update=quirks.get("conditional_update", rc.conditional_update),
                update_create=quirks.get("update_create", rc.update_create),
                search_params=rc.search_params,
                operations=rc.operations,
            )
        system = (set(self.system_interactions) | set(quirks.get("system_allow", ()))) - set(
            quirks.get("system_deny", ())
        )
        return Capabilities(
            resources=resources,
            system_interactions=frozenset(system),
            operations=self.operations,
            max_page_size=quirks.get("max_page_size", self.max_page_size),
            stale_if_match_status=quirks.get("stale_if_match_status", self.stale_if_match_status),
            search_session_ttl=quirks.get("search_session_ttl", self.search_session_ttl),
            fhir_version=self.fhir_version,
            quirks={**self.quirks, **quirks},
        )


def _operation_names(operations: Any) -> set[str]:
    return {str(op["name"]).lstrip("$") for op in operations or [] if isinstance(op, Mapping) and op.get("name")}


# --- routing ---------------------------------------------------------------------------------------

#: What the partner must let us write for the whole care plan to live there.
PLAN_TYPES = ("CarePlan", "Goal", "ServiceRequest", "Condition", "Patient")
#: What the partner must let us write to receive referrals while the plan stays ours.
REFERRAL_TYPES = ("ServiceRequest", "Task")


class RouteMode(str, enum.Enum):
    FULL_PLAN = "full plan"  # the plan and everything in it is written to the partner
    REFERRAL_ONLY = "referral only"  # ServiceRequest + Task are written; the partner's plan is read only
    PULL_ONLY = "pull only"  # nothing is written; we read what the partner has


class WriteMethod(str, enum.Enum):
    TRANSACTION = "transaction"  # one all-or-nothing bundle
    BATCH = "batch"  # one bundle, each entry succeeds or fails alone
    SINGLE = "single"  # one request per resource


@dataclass(frozen=True)
class Route:
    """What the sync engine writes to a partner, and how.

    ``writable``: the types to write. ``conditional_create``: the writable types where ``If-None-Exist``
    works (elsewhere: search by identifier first, and treat an ``AmbiguousWrite`` as "look before retrying").
    ``client_ids``: the writable types that accept PUT with our own id (update-as-create).
    ``max_bundle_entries``: the most entries the partner takes in one transaction or batch (``None``: no cap).
    """

    mode: RouteMode
    write_method: WriteMethod
    writable: frozenset[str]
    conditional_create: frozenset[str]
    conditional_update: frozenset[str]
    client_ids: frozenset[str]
    max_bundle_entries: int | None = None

    def can_write(self, resource_type: str) -> bool:
        return resource_type in self.writable


def route(capabilities: Capabilities) -> Route:
    """Decide what to write to a partner from what it offers.

    Full plan when every one of ``PLAN_TYPES`` can be created there (then every type it lets us create is
    writable); referral only when ``ServiceRequest`` and ``Task`` can; otherwise pull only. Writes go as a
    transaction when the partner has one, else as a batch, else one request at a time; a bundle holds at
    most the ``max_bundle_entries`` quirk's number of entries, when one is configured.
    """
    creatable = {t for t in capabilities.resources if capabilities.can_create(t)}
    if all(t in creatable for t in PLAN_TYPES):
        mode, writable = RouteMode.FULL_PLAN, frozenset(creatable)
    elif all(t in creatable for t in REFERRAL_TYPES):
        mode, writable = RouteMode.REFERRAL_ONLY, frozenset(REFERRAL_TYPES)
    else:
        mode, writable = RouteMode.PULL_ONLY, frozenset()
    if capabilities.supports_system("transaction"):
        method = WriteMethod.TRANSACTION
    elif capabilities.supports_system("batch"):
        method = WriteMethod.BATCH
    else:
        method = WriteMethod.SINGLE
    return Route(
        mode=mode,
        write_method=method,
        writable=writable,
        conditional_create=frozenset(t for t in writable if capabilities.conditional_create(t)),
        conditional_update=frozenset(t for t in writable if capabilities.conditional_update(t)),
        client_ids=frozenset(
            t for t in writable if capabilities.supports(t, "update") and capabilities.resource(t).update_create
        ),
        max_bundle_entries=_positive(capabilities.quirks.get("max_bundle_entries"), "max_bundle_entries"),
    )


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
    return value


# --- the port --------------------------------------------------------------------------------------


class PartnerEndpoint(ABC):
    """A partner's FHIR R4 endpoint as the sync engine sees it.

    Errors are ``adapters.errors`` classes; nothing here waits or retries on its own, except ``search``,
    which starts an expired search over once.
    """

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this partner offers (fetched once, then cached)."""

    @abstractmethod
    def read(self, resource_type: str, resource_id: str) -> Versioned:
        """The current version of one resource; ``NotFound`` when absent."""

    @abstractmethod
    def search_page(self, resource_type: str, params_or_url: SearchParams | str) -> Page:
        """One page: the first for search parameters, or the page behind a ``Page.next`` link."""

    @abstractmethod
    def create(self, resource: Mapping[str, Any], if_none_exist: str | None = None) -> Versioned:
        """POST a new resource; with ``if_none_exist`` (``"identifier=system|value"``) a conditional create."""

    @abstractmethod
    def update(self, resource: Mapping[str, Any], if_match: str | None = None) -> Versioned:
        """PUT ``resource`` at its id; with ``if_match`` (a version id or ETag) a conditional update that
        raises ``VersionConflict`` when the partner's version moved on."""

    @abstractmethod
    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction bundle; returns the transaction-response bundle."""

    @abstractmethod
    def batch(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a batch bundle; returns the batch-response bundle (entries may fail one by one)."""

    @abstractmethod
    def operation(
        self, resource_type: str | None, name: str, parameters: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Invoke ``$name`` at type level (or system level when ``resource_type`` is None), e.g. ``$member-match``."""

    def search(self, resource_type: str, params: SearchParams | None = None) -> Iterator[dict[str, Any]]:
        """Every resource a search finds, across all pages, each (type, id) once.

        When the partner expires the search session part-way, the search starts over from the first page,
        once; what was already yielded is not yielded again. A next link seen before ends the walk.
        """
        seen: set[tuple[str, str]] = set()
        restarts_left = 1
        while True:
            try:
                yield from self._walk(resource_type, dict(params or {}), seen)
                return
            except SearchExpired:
                if restarts_left == 0:
                    raise
                restarts_left -= 1

    def _walk(
        self, resource_type: str, params: SearchParams, seen: set[tuple[str, str]]
    ) -> Iterator[dict[str, Any]]:
        page = self.search_page(resource_type, params)
        followed: set[str] = set()
        while True:
            for resource in page.resources:
                key = (str(resource.get("resourceType")), str(resource.get("id")))
                if resource.get("id") is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield resource
            if not page.next or page.next in followed:
                return
            followed.add(page.next)
            page = self.search_page(resource_type, page.next)
