"""Hypothesis strategies for valid case records (``service.domain.Case``).

Every case drawn here holds together (``rule_violations(case) == []``) and every value in it is valid
FHIR once converted: ids are FHIR ids (1-12 letters, digits, hyphens), free text is non-empty, trimmed
and printable (sometimes non-ASCII), dates are FHIR ``date`` strings of mixed precision, date-times carry
seconds and an offset. The ``fhir``, ``task_fhir`` and ``care_team_fhir`` extras are always None: they
belong to records imported from FHIR, and these strategies make records as a case manager enters them.

Strategies named in the plural draw one value each, as ``st.integers()`` does: ``needs()`` draws one
``Need``. ``cases()`` draws the needs first, then goals addressing them, then services linked to both.

The leaf strategies are built once, at import: building strategies inside a draw makes Hypothesis
validate them (and read lambdas' source for labels) on every example, which is what makes big
composite strategies slow.
"""
from __future__ import annotations

import functools
import string
from datetime import date
from typing import Callable, Optional, Sequence, TypeVar

from hypothesis import strategies as st

from service.domain import (
    CASE_STATUSES, DOMAINS, GENDERS, GOAL_PRIORITIES, GOAL_STATUSES, IDENTIFIER_KINDS, NEED_STATUSES,
    PROGRAMS, RISK_LEVELS, SERVICE_KINDS, SERVICE_PRIORITIES, SERVICE_STATUSES, SEVERITIES, SSN_SYSTEMS,
    Address, Case, Client, Code, Contact, Goal, Identifier, Need, Note, Organization, PersonName,
    ProgressEntry, Provider, Risk, Service, Sharing, Target, TeamMember,
)

__all__ = [
    "ids", "words", "texts", "dates", "date_times", "dates_or_date_times", "phones", "emails", "uris",
    "identifier_systems", "codes", "identifiers", "person_names", "addresses", "contacts", "clients",
    "organizations", "team_members", "risks", "needs", "targets", "progress_entries", "goals",
    "providers", "services", "notes", "sharings", "cases",
]

T = TypeVar("T")

#: most entities a case has of one kind (needs, goals, services, notes); the care team has at most 3
MAX_LIST = 5
_ID_ALPHABET = string.ascii_letters + string.digits + "-"
_MIN_DATE = date(1900, 1, 1)
_MAX_DATE = date(2100, 12, 31)

_BOOL = st.booleans()


def _maybe(draw: Callable, strategy: st.SearchStrategy[T]) -> Optional[T]:
    """A value from ``strategy`` half the time, else None (None is what it shrinks to)."""
    return draw(strategy) if draw(_BOOL) else None


@functools.lru_cache(maxsize=None)
def _index_lists(n: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n - 1), max_size=min(n, max_size), unique=True)


def _subset(draw: Callable, choices: Sequence[str], max_size: int = 3) -> list[str]:
    """Distinct members of ``choices``, in drawn order (none when there are no choices)."""
    if not choices:
        return []
    return [choices[i] for i in draw(_index_lists(len(choices), max_size))]


# --- ids ------------------------------------------------------------------------------------------

_IDS = st.text(_ID_ALPHABET, min_size=1, max_size=12)


def ids() -> st.SearchStrategy[str]:
    """A FHIR id, kept short: 1-12 letters, digits and hyphens."""
    return _IDS


@functools.lru_cache(maxsize=None)
def _unique_ids(max_size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(_IDS, max_size=max_size, unique=True)


# --- text -----------------------------------------------------------------------------------------

# Names and words a record really has, some with non-ASCII letters, so examples read like records.
_PERSON_NAMES = (
    "José", "Nguyễn", "Zoë", "María", "García", "Müller", "Søren", "Chloé", "Siobhán", "Łukasz",
    "Björk", "Ngozi", "Okafor", "O'Brien", "Smith", "Ana", "Lee", "Çelik", "Đặng", "李", "Anh",
)
_WORDS = _PERSON_NAMES + (
    "housing", "rent", "shelter", "food", "bus", "pass", "ride", "clinic", "follow-up", "visit",
    "weekly", "call", "benefits", "SNAP", "job", "school", "court", "safety", "plan", "caregiver",
    "discharge", "meds", "A1c", "7.0%", "<", ">", "&", "\"quoted\"", "(see", "note)", "#3", "50/50",
)
# Letters, numbers, punctuation, symbols and the plain space: no other whitespace, no separators,
# controls, surrogates or combining marks.
_TEXT_CHARS = st.characters(categories=("L", "N", "P", "S"), include_characters=" ")
_ASCII_TEXT_CHARS = string.ascii_letters + string.digits + string.punctuation + " "
_KNOWN_WORDS = st.sampled_from(_WORDS)
_WORD = st.one_of(
    _KNOWN_WORDS,
    st.text(_ASCII_TEXT_CHARS.strip(), min_size=1, max_size=8),
    st.text(_TEXT_CHARS.filter(lambda c: c != " "), min_size=1, max_size=6),
)


def _tidy(text: str) -> str:
    return " ".join(text.split())


def words() -> st.SearchStrategy[str]:
    """One word: no whitespace, printable, sometimes non-ASCII."""
    return _WORD


@functools.lru_cache(maxsize=None)
def texts(max_words: int = 4) -> st.SearchStrategy[str]:
    """Free text: non-empty, trimmed, printable, words separated by single spaces (so also a valid
    FHIR ``code``). A third are real words (some non-ASCII), a third ASCII noise with punctuation, a
    third any letters, numbers, punctuation and symbols. Each is one or two choices, to keep cases small.
    """
    max_chars = 6 * max_words
    return st.one_of(
        st.lists(_KNOWN_WORDS, min_size=1, max_size=max_words).map(" ".join),
        st.text(_ASCII_TEXT_CHARS, min_size=1, max_size=max_chars).map(_tidy).filter(bool),
        st.text(_TEXT_CHARS, min_size=1, max_size=max_chars).map(_tidy).filter(bool),
    )


_TEXT = texts()
_SHORT_TEXT = texts(2)
_NAME_TEXT = texts(3)
_LONG_TEXT = texts(8)
_NAMES = st.one_of(st.sampled_from(_PERSON_NAMES), _SHORT_TEXT)


# --- dates ----------------------------------------------------------------------------------------

# A day as its ordinal: one choice instead of three.
_CALENDAR_DAYS = st.integers(_MIN_DATE.toordinal(), _MAX_DATE.toordinal()).map(date.fromordinal)
_PRECISIONS = st.sampled_from((4, 7, 10))  # YYYY, YYYY-MM, YYYY-MM-DD


@st.composite
def _mixed_precision_dates(draw) -> str:
    return draw(_CALENDAR_DAYS).isoformat()[:draw(_PRECISIONS)]


_DATES = _mixed_precision_dates()


def dates() -> st.SearchStrategy[str]:
    """A FHIR ``date``: ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD`` of a real day in 1900-2100."""
    return _DATES


_OFFSETS = st.sampled_from((
    "Z", "+00:00", "-05:00", "-08:00", "+01:00", "+05:30", "+05:45", "-03:30", "+09:00", "+14:00",
    "-12:00", "-10:00",
))
_SECONDS_OF_DAY = st.integers(0, 24 * 3600 - 1)
_FRACTIONS = st.text(string.digits, min_size=1, max_size=6)


@st.composite
def _date_times(draw) -> str:
    day = draw(_CALENDAR_DAYS).isoformat()
    seconds = draw(_SECONDS_OF_DAY)
    hh, mm, ss = seconds // 3600, seconds // 60 % 60, seconds % 60
    fraction = _maybe(draw, _FRACTIONS)
    return f"{day}T{hh:02d}:{mm:02d}:{ss:02d}{'.' + fraction if fraction else ''}{draw(_OFFSETS)}"


_DATE_TIMES = _date_times()
_DATES_OR_DATE_TIMES = _DATES | _DATE_TIMES


def date_times() -> st.SearchStrategy[str]:
    """A FHIR ``dateTime`` to the second: ``YYYY-MM-DDThh:mm:ss[.f{1,6}](Z|+hh:mm|-hh:mm)``."""
    return _DATE_TIMES


def dates_or_date_times() -> st.SearchStrategy[str]:
    """Either of the above, for the fields that may be a day or a moment."""
    return _DATES_OR_DATE_TIMES


# --- contact points, uris, codes ------------------------------------------------------------------

_FOUR_DIGITS = st.integers(0, 9999)
_PHONES = st.one_of(
    _FOUR_DIGITS.map("+1-555-{:04d}".format),
    _FOUR_DIGITS.map("(555) 555-{:04d}".format),
    _FOUR_DIGITS.map("+44 20 7946 {:04d}".format),
)


def phones() -> st.SearchStrategy[str]:
    return _PHONES


_EMAILS = st.builds(
    "{}{}@{}".format,
    st.sampled_from(string.ascii_lowercase),
    st.text(string.ascii_lowercase + string.digits + "._", max_size=7).filter(
        lambda s: not s.endswith(".") and ".." not in s),
    st.sampled_from(("example.org", "example.com", "example.net", "clinic.example.org")),
)


def emails() -> st.SearchStrategy[str]:
    return _EMAILS


_SEGMENTS = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
_URIS = st.one_of(
    st.builds("{}://{}.example.org/{}".format, st.sampled_from(("http", "https")), _SEGMENTS, _SEGMENTS),
    st.lists(st.integers(0, 999), min_size=2, max_size=4).map(
        lambda arcs: "urn:oid:1.3.6.1.4.1." + ".".join(map(str, arcs))),
)


def uris() -> st.SearchStrategy[str]:
    """An absolute URI without whitespace: ``http(s)://host.example.org/path`` or ``urn:oid:...``."""
    return _URIS


_IDENTIFIER_SYSTEMS = st.one_of(
    st.sampled_from((
        "http://hospital.example.org/mrn", "http://plan.example.com/member-id", "urn:oid:1.2.3.4",
        "https://county.example.gov/hmis/client",
    )),
    _URIS,
).filter(lambda s: s not in SSN_SYSTEMS)  # never rejects anything, but keeps the promise explicit


def identifier_systems() -> st.SearchStrategy[str]:
    """An identifier system; never a Social Security number's."""
    return _IDENTIFIER_SYSTEMS


_CODE_VALUES = {
    "http://snomed.info/sct": st.integers(100000, 999999999999).map(str),
    "http://loinc.org": st.builds("{}-{}".format, st.integers(1000, 99999), st.integers(0, 9)),
    "http://hl7.org/fhir/sid/icd-10-cm": st.builds(
        "{}{:02d}{}".format, st.sampled_from(string.ascii_uppercase), st.integers(0, 99),
        st.one_of(st.just(""), st.text(string.digits + "AX", min_size=1, max_size=3).map(".{}".format))),
    "http://hospital.example.org/codes": st.text(_ID_ALPHABET + ".", min_size=1, max_size=10),
}
_CODES = st.one_of(*(
    st.builds(Code, system=st.just(system), code=value, display=st.none() | _TEXT)
    for system, value in _CODE_VALUES.items()
))


def codes() -> st.SearchStrategy[Code]:
    """A ``Code`` from a real-looking code system; the code has no whitespace."""
    return _CODES


# --- the client -----------------------------------------------------------------------------------

_IDENTIFIERS = st.builds(
    Identifier,
    kind=st.sampled_from(IDENTIFIER_KINDS),
    system=_IDENTIFIER_SYSTEMS,
    value=st.builds("{}{:06d}".format, st.text(string.ascii_uppercase, max_size=3), st.integers(0, 999999)),
)


def identifiers() -> st.SearchStrategy[Identifier]:
    return _IDENTIFIERS


_PREFIXES = st.lists(st.sampled_from(("Dr.", "Ms.", "Mr.", "Mx.", "Sra.")), max_size=1)
_SUFFIXES = st.lists(st.sampled_from(("Jr.", "III", "PhD")), max_size=1)
_GIVEN = st.lists(_NAMES, max_size=2)


@st.composite
def _person_names(draw) -> PersonName:
    name = PersonName(
        family=_maybe(draw, _NAMES),
        given=draw(_GIVEN),
        prefix=draw(_PREFIXES),
        suffix=draw(_SUFFIXES),
        text=_maybe(draw, _NAME_TEXT),
    )
    if not (name.family or name.given or name.text):
        name.family = draw(_NAMES)
    return name


_PERSON_NAME_ST = _person_names()


def person_names() -> st.SearchStrategy[PersonName]:
    """A name with at least one of family, given or text."""
    return _PERSON_NAME_ST


_ADDRESS_LINES = st.lists(_TEXT, max_size=2)
_STATES = st.sampled_from(("OR", "WA", "CA", "NY", "TX", "Québec", "Bayern"))
_POSTAL_CODES = st.builds("{:05d}".format, st.integers(0, 99999)) | st.builds(
    "{:05d}-{:04d}".format, st.integers(0, 99999), _FOUR_DIGITS)
_COUNTRIES = st.sampled_from(("US", "CA", "MX", "DE", "VN"))


@st.composite
def _addresses(draw) -> Address:
    address = Address(
        lines=draw(_ADDRESS_LINES),
        city=_maybe(draw, _NAMES),
        state=_maybe(draw, _STATES),
        postal_code=_maybe(draw, _POSTAL_CODES),
        country=_maybe(draw, _COUNTRIES),
    )
    if not (address.lines or address.city or address.state or address.postal_code or address.country):
        address.city = draw(_NAMES)
    return address


_ADDRESSES = _addresses()


def addresses() -> st.SearchStrategy[Address]:
    """An address with at least one part (an empty FHIR Address is not valid)."""
    return _ADDRESSES


_RELATIONSHIPS = st.sampled_from(("mother", "son", "friend", "neighbor", "guardian")) | _SHORT_TEXT


@st.composite
def _contacts(draw) -> Contact:
    return Contact(name=draw(_NAME_TEXT), relationship=_maybe(draw, _RELATIONSHIPS),
                   phone=_maybe(draw, _PHONES), email=_maybe(draw, _EMAILS))


_CONTACTS = _contacts()


def contacts() -> st.SearchStrategy[Contact]:
    return _CONTACTS


_CLIENT_IDENTIFIERS = st.lists(_IDENTIFIERS, max_size=3, unique_by=lambda i: (i.system, i.value))
_CLIENT_NAMES = st.lists(_PERSON_NAME_ST, max_size=2)
_GENDERS = st.sampled_from(GENDERS)
_LANGUAGES = st.sampled_from(("en", "es", "en-US", "es-MX", "vi", "zh-Hans", "fr-CA", "ar", "so", "ru"))


@st.composite
def _clients(draw) -> Client:
    return Client(
        id=_maybe(draw, _IDS),
        identifiers=draw(_CLIENT_IDENTIFIERS),
        names=draw(_CLIENT_NAMES),
        preferred_name=_maybe(draw, _NAMES),
        birth_date=_maybe(draw, _DATES),
        gender=_maybe(draw, _GENDERS),
        phone=_maybe(draw, _PHONES),
        email=_maybe(draw, _EMAILS),
        address=_maybe(draw, _ADDRESSES),
        language=_maybe(draw, _LANGUAGES),
        interpreter_needed=_maybe(draw, _BOOL),
        emergency_contact=_maybe(draw, _CONTACTS),
        fhir=None,
    )


_CLIENTS = _clients()


def clients() -> st.SearchStrategy[Client]:
    """A client: 0-3 identifiers (distinct system and value, no SSN), 0-2 names, optional details."""
    return _CLIENTS


# --- organization and team ------------------------------------------------------------------------

def _organization(draw, id: str) -> Organization:
    return Organization(id=id, name=_maybe(draw, _TEXT), fhir=None)


_ROLES = st.sampled_from(("case manager", "social worker", "nurse", "primary care physician",
                          "peer support specialist")) | _SHORT_TEXT


def _team_member(draw, id: str) -> TeamMember:
    return TeamMember(
        id=id,
        name=draw(_NAME_TEXT),
        role=_maybe(draw, _ROLES),
        organization=_maybe(draw, _TEXT),
        phone=_maybe(draw, _PHONES),
        email=_maybe(draw, _EMAILS),
        fhir=None,
    )


_RISK_LEVELS = st.sampled_from(RISK_LEVELS)
_SCORES = st.integers(0, 10000).map(lambda n: n / 100)  # at most two decimals: exact through JSON


@st.composite
def _risks(draw) -> Risk:
    return Risk(level=draw(_RISK_LEVELS), assessed=_maybe(draw, _DATES), score=_maybe(draw, _SCORES))


_RISKS = _risks()


def risks() -> st.SearchStrategy[Risk]:
    """A risk level; the score, when there is one, has at most two decimals (0.00-100.00)."""
    return _RISKS


# --- needs, goals, services, notes ----------------------------------------------------------------

_DOMAINS = st.sampled_from(DOMAINS)
_SEVERITIES = st.sampled_from(SEVERITIES)
_NEED_STATUSES = st.sampled_from(NEED_STATUSES)


def _need(draw, id: str) -> Need:
    return Need(
        id=id,
        domain=draw(_DOMAINS),
        description=draw(_TEXT),
        severity=_maybe(draw, _SEVERITIES),
        status=draw(_NEED_STATUSES),
        identified=_maybe(draw, _DATES),
        code=_maybe(draw, _CODES),
        fhir=None,
    )


@st.composite
def _targets(draw) -> Target:
    return Target(measure=draw(_TEXT), value=_maybe(draw, _SHORT_TEXT))


_TARGETS = _targets()


def targets() -> st.SearchStrategy[Target]:
    return _TARGETS


@st.composite
def _progress_entries(draw) -> ProgressEntry:
    return ProgressEntry(date=draw(_DATES_OR_DATE_TIMES), note=draw(_TEXT), author=_maybe(draw, _NAME_TEXT))


_PROGRESS_ENTRIES = _progress_entries()
_PROGRESS = st.lists(_PROGRESS_ENTRIES, max_size=3)


def progress_entries() -> st.SearchStrategy[ProgressEntry]:
    """A progress entry, dated with a day or a moment."""
    return _PROGRESS_ENTRIES


_GOAL_PRIORITIES = st.sampled_from(GOAL_PRIORITIES)
_GOAL_STATUSES = st.sampled_from(GOAL_STATUSES)


def _goal(draw, id: str, need_ids: Sequence[str]) -> Goal:
    status = draw(_GOAL_STATUSES)
    return Goal(
        id=id,
        description=draw(_TEXT),
        domain=draw(_DOMAINS),
        priority=_maybe(draw, _GOAL_PRIORITIES),
        status=status,
        start=_maybe(draw, _DATES),
        target_date=_maybe(draw, _DATES),
        achieved_date=_maybe(draw, _DATES) if status in ("achieved", "not_achieved") else None,
        target=_maybe(draw, _TARGETS),
        progress=draw(_PROGRESS),
        addresses=_subset(draw, need_ids),
        fhir=None,
    )


@st.composite
def _providers(draw) -> Provider:
    provider = Provider(
        name=_maybe(draw, _NAME_TEXT),
        organization=_maybe(draw, _TEXT),
        phone=_maybe(draw, _PHONES),
        email=_maybe(draw, _EMAILS),
    )
    if provider.name is None and provider.organization is None:
        provider.organization = draw(_TEXT)
    return provider


_PROVIDERS = _providers()


def providers() -> st.SearchStrategy[Provider]:
    """A provider with at least one of name or organization."""
    return _PROVIDERS


_SERVICE_KINDS = st.sampled_from(SERVICE_KINDS)
_SERVICE_STATUSES = st.sampled_from(SERVICE_STATUSES)
_SERVICE_PRIORITIES = st.sampled_from(SERVICE_PRIORITIES)
_SERVICE_NOTES = st.lists(_TEXT, max_size=3)


def _service(draw, id: str, need_ids: Sequence[str], goal_ids: Sequence[str]) -> Service:
    return Service(
        id=id,
        kind=draw(_SERVICE_KINDS),
        description=draw(_TEXT),
        domain=draw(_DOMAINS),
        code=_maybe(draw, _CODES),
        provider=_maybe(draw, _PROVIDERS),
        status=draw(_SERVICE_STATUSES),
        priority=_maybe(draw, _SERVICE_PRIORITIES),
        requested=_maybe(draw, _DATES_OR_DATE_TIMES),
        scheduled=_maybe(draw, _DATES_OR_DATE_TIMES),
        start=_maybe(draw, _DATES_OR_DATE_TIMES),
        end=_maybe(draw, _DATES_OR_DATE_TIMES),
        goals=_subset(draw, goal_ids),
        needs=_subset(draw, need_ids),
        notes=draw(_SERVICE_NOTES),
        fhir=None,
        task_fhir=None,
    )


def _note(draw, id: str) -> Note:
    return Note(id=id, time=draw(_DATE_TIMES), text=draw(_LONG_TEXT), author=_maybe(draw, _NAME_TEXT),
                confidential=draw(_BOOL))


_SHARINGS = st.builds(Sharing, restricted_domains=st.lists(_DOMAINS, max_size=3, unique=True))


def sharings() -> st.SearchStrategy[Sharing]:
    """Restricted domains: a few distinct members of DOMAINS (often none)."""
    return _SHARINGS


# --- public strategies for single entities, with a given id or a drawn one ------------------------

def _with_id(build: Callable[..., T], id: Optional[str], *args) -> st.SearchStrategy[T]:
    @st.composite
    def strategy(draw) -> T:
        return build(draw, draw(_IDS) if id is None else id, *args)
    return strategy()


def organizations(id: Optional[str] = None) -> st.SearchStrategy[Organization]:
    return _with_id(_organization, id)


def team_members(id: Optional[str] = None) -> st.SearchStrategy[TeamMember]:
    return _with_id(_team_member, id)


def needs(id: Optional[str] = None) -> st.SearchStrategy[Need]:
    return _with_id(_need, id)


def goals(id: Optional[str] = None, need_ids: Sequence[str] = ()) -> st.SearchStrategy[Goal]:
    """A goal addressing some (distinct) of ``need_ids``."""
    return _with_id(_goal, id, tuple(need_ids))


def services(id: Optional[str] = None, need_ids: Sequence[str] = (),
             goal_ids: Sequence[str] = ()) -> st.SearchStrategy[Service]:
    """A service linked to some of ``need_ids`` and ``goal_ids``; its times are dates or date-times."""
    return _with_id(_service, id, tuple(need_ids), tuple(goal_ids))


def notes(id: Optional[str] = None) -> st.SearchStrategy[Note]:
    """A note, timed to the second with an offset."""
    return _with_id(_note, id)


# --- the case -------------------------------------------------------------------------------------

_CLOSING_STATUSES = ("closed", "cancelled")
_PROGRAMS = st.sampled_from(PROGRAMS)
_ENTITY_IDS = _unique_ids(MAX_LIST)
_CARE_TEAM_IDS = _unique_ids(3)


@functools.lru_cache(maxsize=None)
def _statuses(statuses: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(statuses)


@st.composite
def _cases(draw, statuses: tuple[str, ...]) -> Case:
    status = draw(_statuses(statuses))
    opened = _maybe(draw, _DATES)
    closed = closure_reason = None
    if status in _CLOSING_STATUSES:
        closed = _maybe(draw, _DATES)
        if opened is not None and closed is not None and closed[:10] < opened[:10]:
            opened, closed = closed, opened  # the domain compares the first ten characters
        closure_reason = _maybe(draw, _TEXT)

    need_ids = draw(_ENTITY_IDS)
    case_needs = [_need(draw, i) for i in need_ids]
    goal_ids = draw(_ENTITY_IDS)
    case_goals = [_goal(draw, i, need_ids) for i in goal_ids]
    case_services = [_service(draw, i, need_ids, goal_ids) for i in draw(_ENTITY_IDS)]
    case_notes = [_note(draw, i) for i in draw(_ENTITY_IDS)]
    member_ids = draw(_CARE_TEAM_IDS)
    care_team = [_team_member(draw, i) for i in member_ids]
    case_manager = None
    if draw(_BOOL):
        manager_id, n = draw(_IDS), 0
        while manager_id in member_ids:  # rare: the case manager is someone else
            manager_id, n = f"cm-{n}", n + 1
        case_manager = _team_member(draw, manager_id)

    return Case(
        id=draw(_IDS),
        program=draw(_PROGRAMS),
        status=status,
        organization=_organization(draw, draw(_IDS)),
        client=draw(_CLIENTS),
        opened=opened,
        closed=closed,
        closure_reason=closure_reason,
        title=_maybe(draw, _TEXT),
        risk=_maybe(draw, _RISKS),
        case_manager=case_manager,
        care_team=care_team,
        needs=case_needs,
        goals=case_goals,
        services=case_services,
        notes=case_notes,
        sharing=draw(_SHARINGS),
        fhir=None,
        care_team_fhir=None,
    )


@functools.lru_cache(maxsize=None)
def _cached_cases(statuses: tuple[str, ...]) -> st.SearchStrategy[Case]:
    return _cases(statuses)


def cases(statuses: Sequence[str] = CASE_STATUSES) -> st.SearchStrategy[Case]:
    """A case record that holds together (``rule_violations(case) == []``).

    ``statuses`` limits the case status, e.g. ``[s for s in CASE_STATUSES if s != "entered_in_error"]``.
    A closed date and a reason for closure appear only on closed or cancelled cases, and the closed
    date is never before the opened one. The case manager's id is never a care-team member's id.
    """
    statuses = tuple(statuses)
    if not statuses or not set(statuses) <= set(CASE_STATUSES):
        raise ValueError(f"statuses must be some of {CASE_STATUSES}, not {statuses!r}")
    return _cached_cases(statuses)
