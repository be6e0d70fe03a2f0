"""The case record as JSON: marshmallow schemas that load it into ``service.domain`` and dump it back.

JSON field names are the dataclass field names. Unknown fields are rejected; enumerated fields take
the values listed in ``service.domain``; dates stay the strings they arrived as (checked to be real
calendar dates), so ``load(dump(case)) == case`` and a partner's precision survives. ``fhir``,
``task_fhir`` and ``care_team_fhir`` are opaque objects passed through as they are. Dumping leaves out
``None`` values and empty lists and nothing else.

The schemas are the one definition of the format. ``load_case`` and ``dump_case`` run a plan compiled
from them once, at import, because marshmallow's own machinery costs milliseconds on a full case; a
record the plan does not accept is loaded again by marshmallow, which reports every problem.
"""
from __future__ import annotations

import calendar
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_dump, post_load, validates_schema

from service.domain import (
    CASE_STATUSES, DOMAINS, GENDERS, GOAL_PRIORITIES, GOAL_STATUSES, IDENTIFIER_KINDS, NEED_STATUSES,
    PROGRAMS, RISK_LEVELS, SERVICE_KINDS, SERVICE_PRIORITIES, SERVICE_STATUSES, SEVERITIES,
    Address, Case, Client, Code, Contact, Goal, Identifier, Need, Note, Organization, PersonName,
    ProgressEntry, Provider, Risk, Service, Sharing, Target, TeamMember, rule_violations,
)
from service.errors import Invalid, Problem, Unprocessable

__all__ = ["load_case", "dump_case", "CaseSchema", "problems_from"]

_MESSAGES = {
    "required": "required",
    "null": "must not be null",
    "validator_failed": "invalid value",
}

# FHIR R4 date and dateTime (https://hl7.org/fhir/R4/datatypes.html#date): a year is four digits but
# not 0000; a time needs seconds and a time zone.
_YEAR = r"(?P<year>(?!0000)[0-9]{4})"
_MONTH = r"(?P<month>0[1-9]|1[0-2])"
_DAY = r"(?P<day>0[1-9]|[12][0-9]|3[01])"
_TIME = r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{1,9})?"
_ZONE = r"(?:Z|[+-](?:(?:0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
DATE_RE = re.compile(rf"{_YEAR}(?:-{_MONTH}(?:-{_DAY})?)?")
DATE_TIME_RE = re.compile(rf"{_YEAR}(?:-{_MONTH}(?:-{_DAY}(?:{_TIME}{_ZONE})?)?)?")
_ZONELESS_RE = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}{_TIME}")

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CODE_RE = re.compile(r"[^\s]+(?:\s[^\s]+)*")  # FHIR code: no leading, trailing or double whitespace
URI_RE = re.compile(r"\S+")
LANGUAGE_RE = re.compile(r"[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*")  # BCP 47, loosely

_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_KINDS.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------- fields


class _Plain(fields.Field):
    """A field whose JSON value is its loaded value. ``convert`` checks it, for marshmallow and for the
    compiled plan alike, and raises ``ValidationError``; dumping gives the value back as it is."""

    default_error_messages = _MESSAGES

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        return self.convert(value)

    def convert(self, value: Any) -> Any:
        raise NotImplementedError

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        return value


class Text(_Plain):
    """A string that is not empty and not only whitespace; kept exactly as given."""

    default_error_messages = {
        "invalid": "must be a string",
        "blank": "must not be empty or only whitespace",
    }

    def convert(self, value: Any) -> str:
        if type(value) is not str:
            raise self.make_error("invalid")
        if not value or value.isspace():
            raise self.make_error("blank")
        return self._check(value)

    def _check(self, value: str) -> str:
        return value


class _Pattern(Text):
    pattern: re.Pattern[str]

    def _check(self, value: str) -> str:
        if self.pattern.fullmatch(value) is None:
            raise self.make_error("format")
        return value


class Id(_Pattern):
    """An id that is also a valid FHIR id: 1 to 64 of ``A-Z a-z 0-9 - .``."""

    pattern = ID_RE
    default_error_messages = {"format": "must be 1 to 64 letters, digits, '-' or '.'"}


class CodeValue(_Pattern):
    pattern = CODE_RE
    default_error_messages = {"format": "must not start or end with whitespace or hold double spaces"}


class Uri(_Pattern):
    pattern = URI_RE
    default_error_messages = {"format": "must not contain whitespace"}


class Language(_Pattern):
    pattern = LANGUAGE_RE
    default_error_messages = {"format": "must be a BCP 47 language tag such as 'es' or 'en-US'"}


class Choice(Text):
    """One of a fixed tuple of values (the tuples in ``service.domain``)."""

    def __init__(self, choices: tuple[str, ...], **kwargs: Any):
        super().__init__(**kwargs)
        self.choices = frozenset(choices)
        self.error_messages["choice"] = "must be one of: " + ", ".join(choices)

    def _check(self, value: str) -> str:
        if value not in self.choices:
            raise self.make_error("choice")
        return value


def _real_date(match: re.Match[str]) -> bool:
    day = match.group("day")
    if day is None or day <= "28":
        return True
    year, month = int(match.group("year")), int(match.group("month"))
    return int(day) <= calendar.monthrange(year, month)[1]


class Date(Text):
    """A FHIR ``date``: ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``, a real calendar date, kept as given."""

    default_error_messages = {
        "format": "must be a date: YYYY, YYYY-MM or YYYY-MM-DD",
        "calendar": "{value} is not a date on the calendar",
    }

    def _check(self, value: str) -> str:
        match = DATE_RE.fullmatch(value)
        if match is None:
            raise self.make_error("format")
        if not _real_date(match):
            raise self.make_error("calendar", value=value)
        return value


class DateTime(Text):
    """A FHIR ``dateTime``: a date as above or ``YYYY-MM-DDThh:mm:ss[.fff]`` with a time zone."""

    default_error_messages = {
        "format": "must be a date (YYYY, YYYY-MM, YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm:ss+zz:zz)",
        "calendar": "{value} is not a date on the calendar",
        "zone": "a time needs a time zone (Z or +hh:mm)",
    }

    def _check(self, value: str) -> str:
        match = DATE_TIME_RE.fullmatch(value)
        if match is None:
            if _ZONELESS_RE.fullmatch(value) is not None:
                raise self.make_error("zone")
            raise self.make_error("format")
        if not _real_date(match):
            raise self.make_error("calendar", value=value[:10])
        return value


class Bool(_Plain):
    """JSON ``true`` or ``false`` and nothing else (no "yes", no 1)."""

    default_error_messages = {"invalid": "must be true or false"}

    def convert(self, value: Any) -> bool:
        if type(value) is not bool:
            raise self.make_error("invalid")
        return value


class Number(_Plain):
    """A finite JSON number, loaded as a float."""

    default_error_messages = {"invalid": "must be a number"}

    def convert(self, value: Any) -> float:
        if type(value) not in (int, float):
            raise self.make_error("invalid")
        try:
            number = float(value)
        except OverflowError:
            raise self.make_error("invalid") from None
        if not math.isfinite(number):
            raise self.make_error("invalid")
        return number


class Opaque(_Plain):
    """A JSON object passed through unchanged (what a FHIR partner sent that the record does not model)."""

    default_error_messages = {"invalid": "must be an object"}

    def __init__(self, **kwargs: Any):
        super().__init__(allow_none=True, **kwargs)

    def convert(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        return value


def _list(inner: fields.Field, **kwargs: Any) -> fields.List:
    return fields.List(inner, error_messages={"invalid": "must be a list"}, **kwargs)


def _one(schema: type[Schema], **kwargs: Any) -> fields.Nested:
    return fields.Nested(schema, error_messages=_MESSAGES, **kwargs)


def _many(schema: type[Schema]) -> fields.Nested:
    return fields.Nested(schema, many=True, error_messages={**_MESSAGES, "type": "must be a list"})


# --------------------------------------------------------------------------------------------- schemas


class _Record(Schema):
    """Loads into ``__model__``; dumps without ``None`` values and empty lists."""

    __model__: type
    #: at least one of these fields must have a value (an empty name or address says nothing)
    one_of: tuple[str, ...] = ()
    error_messages = {"type": "must be an object", "unknown": "unknown field"}

    class Meta:
        unknown = RAISE

    @validates_schema
    def _check_one_of(self, data: dict[str, Any], **kwargs: Any) -> None:
        if self.one_of and not _has_any(data, self.one_of):
            raise ValidationError("must have at least one of: " + ", ".join(self.one_of))

    @post_load
    def _build(self, data: dict[str, Any], **kwargs: Any) -> Any:
        return self.__model__(**data)

    @post_dump
    def _omit_empty(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None and not (type(v) is list and not v)}


def _has_any(data: dict[str, Any], names: tuple[str, ...]) -> bool:
    return any(data.get(name) not in (None, []) for name in names)


class CodeSchema(_Record):
    __model__ = Code
    system = Uri(required=True)
    code = CodeValue(required=True)
    display = Text(allow_none=True)


class IdentifierSchema(_Record):
    __model__ = Identifier
    kind = Choice(IDENTIFIER_KINDS, required=True)
    system = Uri(required=True)
    value = Text(required=True)


class PersonNameSchema(_Record):
    __model__ = PersonName
    one_of = ("family", "given", "text")
    family = Text(allow_none=True)
    given = _list(Text())
    prefix = _list(Text())
    suffix = _list(Text())
    text = Text(allow_none=True)


class AddressSchema(_Record):
    __model__ = Address
    one_of = ("lines", "city", "state", "postal_code", "country")
    lines = _list(Text())
    city = Text(allow_none=True)
    state = Text(allow_none=True)
    postal_code = Text(allow_none=True)
    country = Text(allow_none=True)


class ContactSchema(_Record):
    __model__ = Contact
    name = Text(required=True)
    relationship = Text(allow_none=True)
    phone = Text(allow_none=True)
    email = Text(allow_none=True)


class ClientSchema(_Record):
    __model__ = Client
    id = Id(allow_none=True)
    identifiers = _many(IdentifierSchema)
    names = _many(PersonNameSchema)
    preferred_name = Text(allow_none=True)
    birth_date = Date(allow_none=True)
    gender = Choice(GENDERS, allow_none=True)
    phone = Text(allow_none=True)
    email = Text(allow_none=True)
    address = _one(AddressSchema, allow_none=True)
    language = Language(allow_none=True)
    interpreter_needed = Bool(allow_none=True)
    emergency_contact = _one(ContactSchema, allow_none=True)
    fhir = Opaque()


class OrganizationSchema(_Record):
    __model__ = Organization
    id = Id(required=True)
    name = Text(allow_none=True)
    fhir = Opaque()


class TeamMemberSchema(_Record):
    __model__ = TeamMember
    id = Id(required=True)
    name = Text(required=True)
    role = Text(allow_none=True)
    organization = Text(allow_none=True)
    phone = Text(allow_none=True)
    email = Text(allow_none=True)
    fhir = Opaque()


class RiskSchema(_Record):
    __model__ = Risk
    level = Choice(RISK_LEVELS, required=True)
    assessed = DateTime(allow_none=True)
    score = Number(allow_none=True)


class NeedSchema(_Record):
    __model__ = Need
    id = Id(required=True)
    domain = Choice(DOMAINS, required=True)
    description = Text(required=True)
    severity = Choice(SEVERITIES, allow_none=True)
    status = Choice(NEED_STATUSES)
    identified = DateTime(allow_none=True)
    code = _one(CodeSchema, allow_none=True)
    fhir = Opaque()


class TargetSchema(_Record):
    __model__ = Target
    measure = Text(required=True)
    value = Text(allow_none=True)


class ProgressEntrySchema(_Record):
    __model__ = ProgressEntry
    date = DateTime(required=True)
    note = Text(required=True)
    author = Text(allow_none=True)


class GoalSchema(_Record):
    __model__ = Goal
    id = Id(required=True)
    description = Text(required=True)
    domain = Choice(DOMAINS)
    priority = Choice(GOAL_PRIORITIES, allow_none=True)
    status = Choice(GOAL_STATUSES)
    start = Date(allow_none=True)
    target_date = Date(allow_none=True)
    achieved_date = Date(allow_none=True)
    target = _one(TargetSchema, allow_none=True)
    progress = _many(ProgressEntrySchema)
    addresses = _list(Id())
    fhir = Opaque()


class ProviderSchema(_Record):
    __model__ = Provider
    one_of = ("name", "organization", "phone", "email")
    name = Text(allow_none=True)
    organization = Text(allow_none=True)
    phone = Text(allow_none=True)
    email = Text(allow_none=True)


class ServiceSchema(_Record):
    __model__ = Service
    id = Id(required=True)
    kind = Choice(SERVICE_KINDS, required=True)
    description = Text(required=True)
    domain = Choice(DOMAINS)
    code = _one(CodeSchema, allow_none=True)
    provider = _one(ProviderSchema, allow_none=True)
    status = Choice(SERVICE_STATUSES)
    priority = Choice(SERVICE_PRIORITIES, allow_none=True)
    requested = DateTime(allow_none=True)
    scheduled = DateTime(allow_none=True)
    start = DateTime(allow_none=True)
    end = DateTime(allow_none=True)
    goals = _list(Id())
    needs = _list(Id())
    notes = _list(Text())
    fhir = Opaque()
    task_fhir = Opaque()


class NoteSchema(_Record):
    __model__ = Note
    id = Id(required=True)
    time = DateTime(required=True)
    text = Text(required=True)
    author = Text(allow_none=True)
    confidential = Bool()


class SharingSchema(_Record):
    __model__ = Sharing
    restricted_domains = _list(Choice(DOMAINS))


class CaseSchema(_Record):
    __model__ = Case
    id = Id(required=True)
    program = Choice(PROGRAMS, required=True)
    status = Choice(CASE_STATUSES, required=True)
    organization = _one(OrganizationSchema, required=True)
    client = _one(ClientSchema, required=True)
    opened = DateTime(allow_none=True)
    closed = DateTime(allow_none=True)
    closure_reason = Text(allow_none=True)
    title = Text(allow_none=True)
    risk = _one(RiskSchema, allow_none=True)
    case_manager = _one(TeamMemberSchema, allow_none=True)
    care_team = _many(TeamMemberSchema)
    needs = _many(NeedSchema)
    goals = _many(GoalSchema)
    services = _many(ServiceSchema)
    notes = _many(NoteSchema)
    sharing = _one(SharingSchema)
    fhir = Opaque()
    care_team_fhir = Opaque()


# ------------------------------------------------------------------------------------ compiled plan
#
# The same steps marshmallow takes for a valid record, without its per-field machinery: each field's own
# ``convert`` on the values present, the required fields, ``one_of``, then the dataclass. Anything out of
# the ordinary (a wrong type, an unknown or missing field, a failed check) gives up and lets marshmallow
# load the record and report every problem.


class _GiveUp(Exception):
    pass


Loader = Callable[[Any], Any]
Dumper = Callable[[Any], Any]


def _loader(schema: _Record) -> Loader:
    model = schema.__model__
    plan: dict[str, tuple[bool, Loader]] = {}
    for name, field in schema.load_fields.items():
        if field.validators or field.data_key is not None or field.attribute is not None:
            raise TypeError(f"{type(schema).__name__}.{name}: the compiled plan does not support this field")
        plan[name] = (field.allow_none, _value_loader(field))
    names = frozenset(plan)
    required = tuple(name for name, field in schema.load_fields.items() if field.required)
    one_of = schema.one_of

    def load(data: Any) -> Any:
        if type(data) is not dict or not names.issuperset(data):
            raise _GiveUp
        values = {}
        for key, value in data.items():
            allow_none, convert = plan[key]
            if value is None:
                if not allow_none:
                    raise _GiveUp
                values[key] = None
            else:
                values[key] = convert(value)
        for name in required:
            if name not in values:
                raise _GiveUp
        if one_of and not _has_any(values, one_of):
            raise _GiveUp
        return model(**values)

    return load


def _value_loader(field: fields.Field) -> Loader:
    if isinstance(field, fields.Nested):
        item = _loader(field.schema)
        return _each(item) if field.many else item
    if isinstance(field, fields.List):
        return _each(_value_loader(field.inner))
    if isinstance(field, _Plain):
        return field.convert
    raise TypeError(f"the compiled plan does not support {type(field).__name__} fields")


def _each(item: Loader) -> Loader:
    def load(value: Any) -> list[Any]:
        if type(value) is not list:
            raise _GiveUp
        return [item(v) for v in value]
    return load


def _dumper(schema: _Record) -> Dumper:
    plan = [(name, _value_dumper(field)) for name, field in schema.dump_fields.items()]

    def dump(obj: Any) -> dict[str, Any]:
        out = {}
        for name, convert in plan:
            value = getattr(obj, name)
            if value is None or (type(value) is list and not value):
                continue
            out[name] = value if convert is None else convert(value)
        return out

    return dump


def _value_dumper(field: fields.Field) -> Dumper | None:
    if isinstance(field, fields.Nested):
        item = _dumper(field.schema)
        return (lambda value: [item(v) for v in value]) if field.many else item
    if isinstance(field, fields.List):
        item_or_none = _value_dumper(field.inner)
        if item_or_none is None:
            return list
        item = item_or_none
        return lambda value: [item(v) for v in value]
    return None  # the fields here dump their value as it is


_CASE = CaseSchema()
_load = _loader(_CASE)
_dump = _dumper(_CASE)


# ----------------------------------------------------------------------------------------- public API


def problems_from(messages: Any, path: tuple[str, ...] = ()) -> Iterator[Problem]:
    """Flatten marshmallow's nested error messages into problems with dotted paths (``goals.2.status``);
    list indexes are path parts, and an object's own errors are reported at the object's path."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            yield from problems_from(value, path if key == "_schema" else (*path, str(key)))
    elif isinstance(messages, list):
        for message in messages:
            yield from problems_from(message, path)
    else:
        yield Problem(".".join(path), str(messages))


def load_case(data: object) -> Case:
    """Build a case from its JSON form.

    Raises ``Invalid`` listing every malformed field, then ``Unprocessable`` listing every broken rule
    of ``service.domain.rule_violations``.
    """
    if not isinstance(data, dict):
        raise Invalid("a case record must be a JSON object",
                      [Problem("", f"expected a JSON object, got {_json_kind(data)}")])
    try:
        case: Case = _load(data)
    except (_GiveUp, ValidationError):
        case = _load_or_raise(data)
    violations = rule_violations(case)
    if violations:
        problems = [Problem(path, message) for path, message in violations]
        raise Unprocessable(f"the case record breaks the case rules ({_count(problems)})", problems)
    return case


def _load_or_raise(data: dict[str, Any]) -> Case:
    try:
        return _CASE.load(data)
    except ValidationError as error:
        problems = list(problems_from(error.messages))
        raise Invalid(f"the case record is not valid ({_count(problems)})", problems) from None


def dump_case(case: Case) -> dict[str, Any]:
    """The JSON form of a case (what ``CaseSchema().dump`` gives): no ``None`` values, no empty lists."""
    return _dump(case)


def _count(problems: list[Problem]) -> str:
    return "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
