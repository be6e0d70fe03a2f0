"""The case record's JSON form: fixtures load, round trips hold, and problems name the failing field."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from service import domain
from service.errors import Invalid, Problem, Unprocessable
from service.schemas import CaseSchema, dump_case, load_case, problems_from

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"
FIXTURES = sorted(CASES.glob("*.json"))


def read(name: str) -> dict[str, Any]:
    return json.loads((CASES / name).read_text(encoding="utf-8"))


def minimal(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "case-1", "program": "other", "status": "intake", "organization": {"id": "org-1"}, "client": {},
    }
    data.update(fields)
    return data


def problems(data: object, error: type[Exception] = Invalid) -> list[tuple[str, str]]:
    with pytest.raises(error) as raised:
        load_case(data)
    assert isinstance(raised.value, (Invalid, Unprocessable))
    return [(p.path, p.message) for p in raised.value.problems]


def paths(data: object, error: type[Exception] = Invalid) -> list[str]:
    return [path for path, _ in problems(data, error)]


# -------------------------------------------------------------------------------------------- fixtures


def test_the_fixtures_are_all_there() -> None:
    names = {path.name for path in FIXTURES}
    assert {"discharge.json", "insurer_high_risk.json", "behavioral_referral.json", "realistic.json",
            "minimal.json"} <= names


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_fixture_loads_and_round_trips(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    case = load_case(data)
    dumped = dump_case(case)
    assert load_case(dumped) == case
    assert dump_case(load_case(dumped)) == dumped
    assert holds(dumped, data)  # nothing the fixture says is lost; defaults such as a status are added


def holds(dumped: Any, data: Any) -> bool:
    """Whether ``dumped`` says everything ``data`` says (it may add defaulted fields)."""
    if isinstance(data, dict):
        return isinstance(dumped, dict) and all(k in dumped and holds(dumped[k], v) for k, v in data.items())
    if isinstance(data, list):
        return isinstance(dumped, list) and len(dumped) == len(data) and all(map(holds, dumped, data))
    return type(dumped) is type(data) and dumped == data


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_load_case_and_dump_case_agree_with_the_schema(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    case = load_case(data)
    assert case == CaseSchema().load(data)
    assert dump_case(case) == CaseSchema().dump(case)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_cross_references_resolve(path: Path) -> None:
    case = load_case(json.loads(path.read_text(encoding="utf-8")))
    assert domain.rule_violations(case) == []
    for goal in case.goals:
        assert all(case.need(ref) for ref in goal.addresses)
    for service in case.services:
        assert all(case.goal(ref) for ref in service.goals)
        assert all(case.need(ref) for ref in service.needs)


def test_realistic_fixture_has_the_benchmark_shape() -> None:
    case = load_case(read("realistic.json"))
    assert (len(case.needs), len(case.goals), len(case.services), len(case.notes)) == (4, 5, 8, 10)
    assert case.case_manager is not None and len(case.care_team) == 2
    assert case.risk is not None
    referrals = [s for s in case.services if s.kind == "referral"]
    assert len(referrals) >= 4 and len({s.status for s in referrals}) >= 4
    client = case.client
    assert len(client.identifiers) == 2 and client.names and client.preferred_name
    assert client.birth_date and client.gender and client.phone and client.email and client.address
    assert client.language == "es" and client.interpreter_needed is True and client.emergency_contact


def test_behavioral_fixture_restricts_substance_use() -> None:
    case = load_case(read("behavioral_referral.json"))
    assert case.sharing.restricted_domains == ["substance_use"]
    assert any(note.confidential for note in case.notes)
    assert any(s.kind == "referral" and s.status == "requested" for s in case.services)


def test_the_example_in_the_documentation_is_valid() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "case-record.md").read_text(encoding="utf-8")
    example = text.split("## Example", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    case = load_case(json.loads(example))
    assert case.needs[0].code == domain.Code("http://snomed.info/sct", "733423003", "Food insecurity")


def test_minimal_case() -> None:
    case = load_case(minimal())
    assert case.client == domain.Client()
    assert case.sharing == domain.Sharing()
    assert dump_case(case) == {**minimal(), "sharing": {}}


# ---------------------------------------------------------------------------------------- round trips


def full_case() -> domain.Case:
    return domain.Case(
        id="c.1-A", program="forensic_legal", status="closed", opened="2023", closed="2024-02-29",
        closure_reason="moved out of county", title="t",
        organization=domain.Organization(id="o", name="Org", fhir={"telecom": [{"value": "1"}]}),
        client=domain.Client(
            id="p", identifiers=[domain.Identifier("mrn", "urn:x", "1")],
            names=[domain.PersonName(given=["A"]), domain.PersonName(text="B", prefix=["Dr"], suffix=["Jr"])],
            preferred_name="Al", birth_date="1980-02", gender="unknown", phone="1", email="a@b",
            address=domain.Address(country="US"), language="en-US", interpreter_needed=False,
            emergency_contact=domain.Contact(name="C"), fhir={},
        ),
        risk=domain.Risk(level="low", score=0.0),
        case_manager=domain.TeamMember(id="m", name="M"),
        care_team=[domain.TeamMember(id="t1", name="T", role="r", organization="o", phone="p", email="e")],
        needs=[domain.Need(id="n", domain="legal", description="d", severity="mild", status="resolved",
                           identified="2023-05", code=domain.Code("http://snomed.info/sct", "32911000"),
                           fhir={"x": [1, None, {"y": True}]})],
        goals=[domain.Goal(id="g", description="d", status="not_achieved", target=domain.Target("m"),
                           progress=[domain.ProgressEntry("2023-05-01T10:00:00.5+14:00", "n")],
                           addresses=["n"])],
        services=[domain.Service(id="s", kind="equipment", description="d",
                                 provider=domain.Provider(email="e"), status="cancelled", priority="stat",
                                 requested="2023",
                                 scheduled="2023-06-01T00:00:00Z", goals=["g"], needs=["n"], notes=["x"],
                                 task_fhir={"owner": {"display": "someone"}})],
        notes=[domain.Note(id="note", time="2016-12-31T23:59:60Z", text="t", confidential=True)],
        sharing=domain.Sharing(["substance_use", "behavioral_health"]),
        care_team_fhir={"name": "team"},
    )


def test_a_full_case_round_trips_exactly() -> None:
    case = full_case()
    assert domain.rule_violations(case) == []
    dumped = dump_case(case)
    assert load_case(dumped) == case
    assert load_case(json.loads(json.dumps(dumped))) == case
    assert dumped == CaseSchema().dump(case)


def test_dates_keep_their_precision() -> None:
    case = load_case(minimal(opened="2024", closed="2024-06", status="closed",
                             client={"birth_date": "1957-04-18"}))
    assert (case.opened, case.closed, case.client.birth_date) == ("2024", "2024-06", "1957-04-18")
    assert dump_case(case)["opened"] == "2024"


def test_dump_omits_none_and_empty_lists_but_keeps_false() -> None:
    case = load_case(minimal(notes=[{"id": "n", "time": "2024-01-01", "text": "t"}], care_team=[]))
    dumped = dump_case(case)
    assert "care_team" not in dumped and "title" not in dumped and "risk" not in dumped
    assert dumped["notes"] == [{"id": "n", "time": "2024-01-01", "text": "t", "confidential": False}]


def test_opaque_fhir_passes_through_unchanged() -> None:
    extras = {"extension": [{"url": "http://example.org/x", "valueString": "y"}], "meta": {"tag": []}}
    case = load_case(minimal(fhir=extras, client={"fhir": {"deceasedBoolean": False}}))
    assert case.fhir == extras
    assert dump_case(case)["fhir"] == extras
    assert dump_case(case)["client"] == {"fhir": {"deceasedBoolean": False}}


# ----------------------------------------------------------------------------------------- problems


def test_a_bad_goal_status_names_the_field() -> None:
    data = minimal(goals=[{"id": "g", "description": "d", "status": "done"}])
    [(path, message)] = problems(data)
    assert path == "goals.0.status"
    assert "must be one of" in message and "achieved" in message


def test_a_date_that_is_not_on_the_calendar() -> None:
    assert problems(minimal(client={"birth_date": "2023-02-30"})) == [
        ("client.birth_date", "2023-02-30 is not a date on the calendar")
    ]
    assert load_case(minimal(client={"birth_date": "2024-02-29"})).client.birth_date == "2024-02-29"
    assert paths(minimal(client={"birth_date": "2023-02-29"})) == ["client.birth_date"]
    assert paths(minimal(opened="2024-04-31")) == ["opened"]


@pytest.mark.parametrize("value", ["24", "2024-5", "2024-05-17T10:00:00Z", "0000", "2024-13", "17/05/2024",
                                   "2024-05-17 ", ""])
def test_dates_must_be_fhir_dates(value: str) -> None:
    assert paths(minimal(client={"birth_date": value})) == ["client.birth_date"]


@pytest.mark.parametrize("value", ["2024", "2024-05", "2024-05-17", "2024-05-17T10:00:00Z",
                                   "2024-05-17T10:00:00.123-05:00", "2024-05-17T23:59:60+14:00"])
def test_date_times_accept_dates_and_times_with_a_zone(value: str) -> None:
    data = minimal(notes=[{"id": "n", "time": value, "text": "t"}],
                   services=[{"id": "s", "kind": "service", "description": "d", "scheduled": value,
                              "start": value, "end": value, "requested": value}],
                   goals=[{"id": "g", "description": "d", "progress": [{"date": value, "note": "n"}]}])
    case = load_case(data)
    assert case.notes[0].time == case.services[0].scheduled == case.goals[0].progress[0].date == value
    assert dump_case(case)["notes"][0]["time"] == value


def test_a_time_needs_a_time_zone() -> None:
    data = minimal(notes=[{"id": "n", "time": "2024-05-17T10:00:00", "text": "t"}])
    assert problems(data) == [("notes.0.time", "a time needs a time zone (Z or +hh:mm)")]
    for value in ("2024-05-17T10:00Z", "2024-05-17T25:00:00Z", "2024-05-17T10:00:00+15:00",
                  "2024-02-30T10:00:00Z"):
        assert paths(minimal(notes=[{"id": "n", "time": value, "text": "t"}])) == ["notes.0.time"], value


def test_unknown_fields_are_rejected() -> None:
    data = minimal(nickname="x", client={"ssn": "123-45-6789"})
    assert sorted(problems(data)) == [("client.ssn", "unknown field"), ("nickname", "unknown field")]


def test_an_ssn_identifier_is_unprocessable() -> None:
    identifier = {"kind": "other", "system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}
    [(path, message)] = problems(minimal(client={"identifiers": [identifier]}), Unprocessable)
    assert path == "client.identifiers.0.system"
    assert "Social Security" in message


def test_a_dangling_reference_is_unprocessable() -> None:
    data = minimal(
        needs=[{"id": "n1", "domain": "food", "description": "d"}],
        goals=[{"id": "g1", "description": "d", "addresses": ["n1", "n2"]}],
        services=[{"id": "s1", "kind": "referral", "description": "d", "goals": ["g9"]}],
    )
    assert paths(data, Unprocessable) == ["goals.0.addresses.1", "services.0.goals.0"]


def test_many_problems_are_reported_at_once() -> None:
    data = minimal(
        id="case 1", program="hospital", organization={}, risk={"level": "extreme", "score": "7"},
        client={"gender": "M", "names": [{}], "interpreter_needed": "yes", "language": "Spanish language"},
        goals=[{"id": "g", "description": " ", "status": "done"}, "not an object"],
        notes=[{"id": "n", "time": "yesterday", "text": "t", "confidential": 1}],
        sharing={"restricted_domains": ["substance_use", "drugs"]},
    )
    with pytest.raises(Invalid) as raised:
        load_case(data)
    assert sorted(p.path for p in raised.value.problems) == sorted([
        "id", "program", "organization.id", "risk.level", "risk.score", "client.gender", "client.names.0",
        "client.interpreter_needed", "client.language", "goals.0.description", "goals.0.status", "goals.1",
        "notes.0.time", "notes.0.confidential", "sharing.restricted_domains.1",
    ])
    assert "15 problems" in raised.value.message
    assert all(isinstance(p, Problem) for p in raised.value.problems)


def test_required_fields() -> None:
    assert sorted(problems({})) == [(name, "required") for name in
                                    ("client", "id", "organization", "program", "status")]
    assert problems(minimal(needs=[{"id": "n"}])) == [("needs.0.domain", "required"),
                                                      ("needs.0.description", "required")]


@pytest.mark.parametrize("data", [[], "case", 3, None, True])
def test_the_record_must_be_an_object(data: object) -> None:
    [(path, message)] = problems(data)
    assert path == ""
    assert message.startswith("expected a JSON object, got ")


def test_nested_objects_and_lists_have_the_right_shape() -> None:
    assert problems(minimal(client=[])) == [("client", "must be an object")]
    assert problems(minimal(goals={})) == [("goals", "must be a list")]
    assert problems(minimal(goals=[None])) == [("goals.0", "must be an object")]
    assert problems(minimal(sharing={"restricted_domains": "food"})) == [
        ("sharing.restricted_domains", "must be a list")
    ]
    assert problems(minimal(fhir=[])) == [("fhir", "must be an object")]


@pytest.mark.parametrize("value", ["", "a b", "x" * 65, "a/b", "a_b", "é", 7])
def test_ids_are_fhir_ids(value: object) -> None:
    assert paths(minimal(id=value)) == ["id"]
    assert paths(minimal(notes=[{"id": value, "time": "2024", "text": "t"}])) == ["notes.0.id"]


def test_a_64_character_id_is_fine() -> None:
    assert load_case(minimal(id="A-1." + "x" * 60)).id == "A-1." + "x" * 60


@pytest.mark.parametrize("value", ["", "   ", "\n\t", 3, ["x"], {}])
def test_strings_are_not_empty(value: object) -> None:
    assert paths(minimal(title=value)) == ["title"]


def test_strings_are_kept_exactly() -> None:
    assert load_case(minimal(title="  padded title ")).title == "  padded title "


def test_nulls() -> None:
    case = load_case(minimal(title=None, risk=None, client={"gender": None, "address": None}))
    assert case.title is None and case.risk is None and case.client.gender is None
    assert problems(minimal(id=None)) == [("id", "must not be null")]
    assert problems(minimal(goals=None)) == [("goals", "must not be null")]
    assert problems(minimal(sharing=None)) == [("sharing", "must not be null")]
    assert problems(minimal(needs=[{"id": "n", "domain": "food", "description": "d", "status": None}])) == [
        ("needs.0.status", "must not be null")
    ]


def test_defaults_from_the_domain() -> None:
    case = load_case(minimal(
        needs=[{"id": "n", "domain": "food", "description": "d"}],
        goals=[{"id": "g", "description": "d"}],
        services=[{"id": "s", "kind": "referral", "description": "d"}],
        notes=[{"id": "x", "time": "2024", "text": "t"}],
    ))
    assert case.needs[0].status == "active"
    assert (case.goals[0].status, case.goals[0].domain) == ("proposed", "other")
    assert (case.services[0].status, case.services[0].domain) == ("draft", "other")
    assert case.notes[0].confidential is False


def test_scores_and_booleans_are_strict() -> None:
    assert load_case(minimal(risk={"level": "high", "score": 3})).risk == domain.Risk("high", score=3.0)
    for score in ("3", True, float("nan"), float("inf"), 10**400):
        assert paths(minimal(risk={"level": "high", "score": score})) == ["risk.score"], score
    for flag in ("true", 1, 0, "false"):
        assert paths(minimal(client={"interpreter_needed": flag})) == ["client.interpreter_needed"], flag


def test_empty_names_addresses_and_providers_say_nothing() -> None:
    data = minimal(client={"names": [{"given": []}], "address": {"lines": []}},
                   services=[{"id": "s", "kind": "referral", "description": "d", "provider": {}}])
    assert sorted(paths(data)) == ["client.address", "client.names.0", "services.0.provider"]


@pytest.mark.parametrize(("field", "choices"), [
    ("program", domain.PROGRAMS), ("status", domain.CASE_STATUSES),
])
def test_every_enumerated_value_loads(field: str, choices: tuple[str, ...]) -> None:
    for value in choices:
        assert getattr(load_case(minimal(**{field: value})), field) == value


def test_every_domain_kind_and_status_loads() -> None:
    data = minimal(
        needs=[{"id": f"n{i}", "domain": d, "description": "d"} for i, d in enumerate(domain.DOMAINS)],
        services=[{"id": f"s{i}", "kind": k, "description": "d", "status": s}
                  for i, (k, s) in enumerate(zip(domain.SERVICE_KINDS * 2, domain.SERVICE_STATUSES,
                                                 strict=True))],
        goals=[{"id": f"g{i}", "description": "d", "status": s} for i, s in enumerate(domain.GOAL_STATUSES)],
        sharing={"restricted_domains": list(domain.DOMAINS)},
    )
    case = load_case(data)
    assert [n.domain for n in case.needs] == list(domain.DOMAINS)
    assert [g.status for g in case.goals] == list(domain.GOAL_STATUSES)


def test_problems_from_flattens_marshmallow_messages() -> None:
    messages = {"goals": {2: {"status": ["bad"], "_schema": ["whole goal"]}}, "_schema": ["top"]}
    assert list(problems_from(messages)) == [
        Problem("goals.2.status", "bad"), Problem("goals.2", "whole goal"), Problem("", "top"),
    ]


# ------------------------------------------------------ load_case never accepts what the schema rejects


def mutations(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, replacement) pairs: every value replaced by wrong or odd values, and removed."""
    for odd in (None, True, 1.5, " ", "x", [], {"x": 1}):
        yield path, odd
    if isinstance(node, dict):
        yield (*path, "unexpected"), 1
        for key, value in node.items():
            yield (*path, key), _REMOVE
            yield from mutations(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from mutations(value, (*path, i))


_REMOVE = object()


def mutated(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(data)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    if value is _REMOVE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def test_load_case_agrees_with_the_schema_on_odd_input() -> None:
    data = read("behavioral_referral.json")
    schema = CaseSchema()
    checked = 0
    for path, value in mutations(data):
        candidate = mutated(data, path, value)
        if not isinstance(candidate, dict):
            continue
        try:
            expected: Any = schema.load(candidate)
        except ValidationError as error:
            expected = sorted(problems_from(error.messages), key=str)
        try:
            got: Any = load_case(candidate)
        except Invalid as error:
            got = sorted(error.problems, key=str)
        except Unprocessable:
            assert isinstance(expected, domain.Case), path
            continue
        assert got == expected, (path, value)
        checked += 1
    assert checked > 1000
