"""Reading FHIR R4 input as partners send it: parse, validate, resolve references, group into cases.

The steps, each usable alone::

    entries = parse(raw)            # one resource, any kind of Bundle, or NDJSON -> flat list of Entry
    problems = validate(entries)    # every problem of every resource, with FHIR element paths
    graph = ResourceGraph(entries)  # nodes (contained ones too) and Bundle reference resolution
    groups = group_cases(graph)     # one CaseGroup per CarePlan, then per Patient, then per subject
    rest = unmapped(graph, groups)  # what no group took and casebridge does not map: report it

Validation is the ``fhir.resources.R4B`` model of each resource (R4B serves R4 here), one
``model_validate`` per resource, plus the required code bindings fhir.resources leaves unchecked
(``mappings.bindings``).
Nothing here mutates the input: every ``resource`` dict is the caller's own JSON object.
"""
from __future__ import annotations

import re
import typing
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Iterator, Optional, Union
from urllib.parse import parse_qsl

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from mappings import bindings
from service.errors import Invalid, Problem

__all__ = [
    "Entry", "Entries", "parse", "validate", "validate_resource", "model_class",
    "Node", "ResourceGraph", "CaseGroup", "group_cases", "unmapped", "CASE_TYPES", "MAPPED_TYPES",
]

# --------------------------------------------------------------------------------------------------
# parse


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource of the input. ``path`` locates it: ``""`` (the input is this resource),
    ``Bundle.entry[3].resource``, ``line 2`` (NDJSON), ``line 2: Bundle.entry[0].resource`` or
    ``[4]`` (an item of a list given in Python)."""
    resource: dict = field(repr=False)
    full_url: Optional[str]
    path: str
    request_method: Optional[str] = None
    request_url: Optional[str] = None

    @property
    def resource_type(self) -> str:
        return self.resource["resourceType"]

    @property
    def element_path(self) -> str:
        """The FHIR element path of the resource itself, the prefix of its elements' paths:
        ``CarePlan``, ``Bundle.entry[3].resource``, ``line 2: CarePlan``."""
        return _element_root(self.path, self.resource.get("resourceType"))


class Entries(list):
    """The list ``parse`` returns: the entries in input order, plus ``warnings`` (entries skipped,
    such as a transaction's DELETE) and ``bundles`` (each Bundle's own envelope, as an Entry, so
    ``validate`` can check Bundle.type, entry.request and the like)."""
    __slots__ = ("warnings", "bundles")

    def __init__(self, entries: Iterable[Entry] = (), warnings: Iterable[Problem] = (),
                 bundles: Iterable[Entry] = ()):
        super().__init__(entries)
        self.warnings: list[Problem] = list(warnings)
        self.bundles: list[Entry] = list(bundles)


_RESPONSE_BUNDLES = frozenset({"transaction-response", "batch-response"})
_BOM = "\ufeff"


def parse(raw: Union[bytes, bytearray, str, dict, list]) -> Entries:
    """Read FHIR JSON: a resource, a Bundle (nested Bundles are flattened), NDJSON or a list of
    resources. Raises ``Invalid`` naming every place that is not JSON or not a FHIR resource."""
    reader = _Reader()
    if isinstance(raw, dict):
        reader.value(raw, "")
    elif isinstance(raw, list):
        reader.items(raw)
    elif isinstance(raw, (bytes, bytearray, memoryview, str)):
        reader.text(raw)
    else:
        raise Invalid("The input is not FHIR JSON",
                      [Problem("", f"expected JSON text or a JSON object, got {type(raw).__name__}")])
    if reader.problems:
        raise Invalid(reader.title or "The input is not FHIR", reader.problems)
    return Entries(reader.entries, reader.warnings, reader.bundles)


class _Reader:
    __slots__ = ("entries", "warnings", "bundles", "problems", "title")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.warnings: list[Problem] = []
        self.bundles: list[Entry] = []
        self.problems: list[Problem] = []
        self.title = ""

    def text(self, raw: Union[bytes, bytearray, memoryview, str]) -> None:
        if isinstance(raw, str):
            raw = raw.removeprefix(_BOM)
        elif raw[:3] == b"\xef\xbb\xbf":
            raw = raw[3:]
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            lines = _ndjson_lines(raw)
            if lines is None:
                self.title = "The input is not valid JSON"
                self.problems.append(Problem("", f"not valid JSON: {error}"))
                return
            for number, value in lines:
                if isinstance(value, orjson.JSONDecodeError):
                    self.title = "The input is not valid NDJSON"
                    self.problems.append(Problem(f"line {number}", f"not valid JSON: {value}"))
                else:
                    self.value(value, f"line {number}")
            return
        if isinstance(document, list):
            self.items(document)
        else:
            self.value(document, "")

    def items(self, values: list) -> None:
        for index, value in enumerate(values):
            self.value(value, f"[{index}]")

    def value(self, value: Any, path: str, full_url: Optional[str] = None,
              method: Optional[str] = None, url: Optional[str] = None) -> None:
        resource_type = value.get("resourceType") if isinstance(value, dict) else None
        if not isinstance(resource_type, str) or not resource_type:
            self.problems.append(Problem(path, "not a FHIR resource: the object has no resourceType"
                                         if isinstance(value, dict) else "not a FHIR resource: expected "
                                         f"an object with a resourceType, got {_json_kind(value)}"))
        elif resource_type == "Bundle":
            self.bundle(value, path, full_url)
        else:
            self.entries.append(Entry(value, full_url, path, method, url))

    def bundle(self, bundle: dict, path: str, full_url: Optional[str]) -> None:
        self.bundles.append(Entry(bundle, full_url, path))
        root = _element_root(path, "Bundle")
        kind = bundle.get("type")
        entries = bundle.get("entry")
        if entries is None:
            return
        if not isinstance(entries, list):
            self.problems.append(Problem(f"{root}.entry", f"expected an array, got {_json_kind(entries)}"))
            return
        for index, entry in enumerate(entries):
            where = f"{root}.entry[{index}]"
            if not isinstance(entry, dict):
                self.problems.append(Problem(where, f"expected an object, got {_json_kind(entry)}"))
                continue
            request = entry.get("request")
            method = url = None
            if isinstance(request, dict):
                method, url = request.get("method"), request.get("url")
                method = method if isinstance(method, str) else None
                url = url if isinstance(url, str) else None
            resource = entry.get("resource")
            entry_url = entry.get("fullUrl")
            entry_url = entry_url if isinstance(entry_url, str) else None
            if method == "DELETE":
                self.warnings.append(Problem(where, f"DELETE {url or '(no url)'}: skipped, a delete "
                                                    "carries no resource to convert"))
            elif resource is None:
                if kind not in _RESPONSE_BUNDLES:
                    what = f"{method} {url}" if method else "entry"
                    self.warnings.append(Problem(where, f"{what}: skipped, the entry has no resource"))
            else:
                self.value(resource, f"{where}.resource", entry_url, method, url)


def _ndjson_lines(raw: Union[bytes, bytearray, memoryview, str]) -> Optional[list[tuple[int, Any]]]:
    """The non-blank lines of ``raw``, each parsed on its own (or its JSONDecodeError), when ``raw``
    looks like NDJSON: more than one line and at least half of them JSON objects; else None."""
    text = raw if isinstance(raw, str) else bytes(raw)
    newline = "\n" if isinstance(text, str) else b"\n"
    lines: list[tuple[int, Any]] = []
    objects = 0
    for number, line in enumerate(text.split(newline), start=1):  # type: ignore[arg-type]
        line = line.strip()
        if not line:
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            value = error
        objects += isinstance(value, dict)
        lines.append((number, value))
    if len(lines) < 2 or objects * 2 < len(lines):
        return None
    return lines


def _element_root(path: str, resource_type: Any) -> str:
    """The element path of a resource from its ``Entry.path``: ``""`` -> ``CarePlan``,
    ``line 2`` -> ``line 2: CarePlan``; a path that is already an element path stays."""
    if not path:
        return str(resource_type)
    if path.endswith(".resource") or (path.endswith("]") and "." in path):
        return path
    return f"{path}: {resource_type}"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------------
# validate

_PLAIN_ENTRY = frozenset({"fullUrl", "resource"})
_MODELS: dict[Any, Any] = {}
_RESOURCE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")

Loc = tuple[Union[str, int], ...]


def model_class(resource_type: Any) -> Optional[type]:
    """The ``fhir.resources.R4B`` model of a resource type, or None when it names no resource."""
    try:
        return _MODELS[resource_type]
    except KeyError:
        pass
    except TypeError:  # unhashable
        return None
    model = None
    if isinstance(resource_type, str) and _RESOURCE_NAME.fullmatch(resource_type) \
            and resource_type not in ("Resource", "DomainResource"):
        try:
            candidate = get_fhir_model_class(resource_type)
        except (ValueError, ImportError):
            candidate = None
        if candidate is not None and candidate.has_resource_base() \
                and candidate.get_resource_type() == resource_type:
            model = candidate
    _MODELS[resource_type] = model
    return model


def validate(entries: Iterable[Entry]) -> list[Problem]:
    """Every problem of every resource (and, for ``parse``'s result, of every Bundle envelope)."""
    problems: list[Problem] = []
    for bundle in getattr(entries, "bundles", ()):
        problems += _validate_envelope(bundle.resource, bundle.element_path)
    for entry in entries:
        problems += validate_resource(entry.resource, entry.path)
    return problems


def validate_resource(resource: dict, path: str = "") -> list[Problem]:
    """Every problem of one resource. ``path`` is where it is (``Entry.path``): ``""`` for a
    resource given alone, whose problems then read ``CarePlan.period.start``;
    ``Bundle.entry[3].resource`` gives ``Bundle.entry[3].resource.period.start``; ``line 2`` gives
    ``line 2: CarePlan.period.start``."""
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    root = _element_root(path, resource_type)
    model = model_class(resource_type)
    if model is None:
        if not isinstance(resource, dict):
            return [Problem(root, f"not a FHIR resource: got {_json_kind(resource)}")]
        return [Problem(f"{root}.resourceType", f"unknown resource type {resource_type!r}")]
    try:
        model.model_validate(resource)
        found: list[tuple[Loc, str]] = []
    except Exception as error:  # ValidationError, or a KeyError from fhir.resources on odd input
        found = _all_structure_problems(model, resource, error)
    found += bindings.check(resource_type, resource)
    contained = resource.get("contained")
    if type(contained) is list:
        for index, item in enumerate(contained):
            if type(item) is dict:
                item_type = item.get("resourceType")
                if item_type is None:
                    found.append((("contained", index, "resourceType"),
                                  "a contained resource needs a resourceType"))
                else:
                    found += bindings.check(item_type, item, ("contained", index))
    return _to_problems(root, found)


def _validate_envelope(bundle: dict, root: str) -> list[Problem]:
    """The Bundle without its entries' resources (each one is validated on its own), and without
    the entries that hold nothing but a fullUrl string (nothing there a model could find wrong:
    a uri is any string), which keeps this to a few percent of validating the resources."""
    entries = bundle.get("entry")
    envelope = bundle
    positions: list[int] = []
    if type(entries) is list:
        kept = []
        for index, item in enumerate(entries):
            if type(item) is dict and (item.keys() <= _PLAIN_ENTRY and type(item.get("fullUrl", "")) is str):
                continue
            kept.append({k: v for k, v in item.items() if k != "resource"} if type(item) is dict else item)
            positions.append(index)
        envelope = dict(bundle)
        envelope["entry"] = kept
    model = model_class("Bundle")
    try:
        model.model_validate(envelope)
        found: list[tuple[Loc, str]] = []
    except Exception as error:
        found = _all_structure_problems(model, envelope, error)
        if positions:
            found = [(("entry", positions[loc[1]]) + loc[2:] if loc[:1] == ("entry",) and len(loc) > 1
                      and type(loc[1]) is int else loc, message) for loc, message in found]
    found += bindings.check("Bundle", bundle)
    return _to_problems(root, found)


def _to_problems(root: str, found: list[tuple[Loc, str]]) -> list[Problem]:
    if not found:
        return []
    if len(found) > 1:
        found.sort(key=lambda item: tuple((0, part, "") if type(part) is int else (1, 0, part)
                                          for part in item[0]))
    problems: dict[Problem, None] = {}
    for loc, message in found:
        path = root + "".join(f"[{part}]" if type(part) is int else f".{part}" for part in loc)
        problems[Problem(path, message)] = None
    return list(problems)


# --- the error path: every problem, not only those pydantic reached ------------------------------
#
# fhir.resources checks required primitives and choice elements (value[x]) in an "after" model
# validator, which pydantic runs only when every field of that model is valid, and rejects nulls in
# arrays in a "before" validator, which hides every other problem of that object. So when a
# resource fails, the same three checks are run here over the whole tree, nulls and unknown
# resource types are neutralised in a copy, the copy is validated again, and the two are merged.

_AFTER_VALIDATOR_MESSAGES = ("Any of one field value is expected", "Expect any of field value")
_NULL_MESSAGE = "None is not allowed as an element of"


def _all_structure_problems(model: type, data: dict, error: Exception) -> list[tuple[Loc, str]]:
    walker = _Walker()
    walker.walk(model, data, ())
    if walker.replace:
        data = _replaced(data, walker.replace)
        try:
            model.model_validate(data)
            errors: list[dict] = []
        except ValidationError as again:
            errors = again.errors(include_url=False)
        except Exception as again:  # noqa: BLE001 - fhir.resources failing on input it should reject
            return walker.found + [((), f"could not be validated: {type(again).__name__}: {again}")]
    elif isinstance(error, ValidationError):
        errors = error.errors(include_url=False)
    else:
        return walker.found + [((), f"could not be validated: {type(error).__name__}: {error}")]
    found = [(tuple(e["loc"]), _message(e)) for e in errors
             if not _is_fhir_model_check(e) and not _under(tuple(e["loc"]), walker.replace)]
    return found + walker.found


def _is_fhir_model_check(error: dict) -> bool:
    kind = error["type"]
    if kind == "model_field_validation.missing":
        return True
    if kind == "value_error":
        return any(text in error["msg"] for text in _AFTER_VALIDATOR_MESSAGES)
    return kind == "list_type" and error["msg"].startswith(_NULL_MESSAGE)


def _under(loc: Loc, replaced: set[Loc]) -> bool:
    return any(loc[:n] in replaced for n in range(1, len(loc) + 1)) if replaced else False


def _replaced(data: Any, positions: set[Loc]) -> Any:
    """A copy of ``data`` with an empty object at each position (the input is never touched)."""
    copy = deepcopy(data)
    for loc in positions:
        target = copy
        for part in loc[:-1]:
            target = target[part]
        target[loc[-1]] = {}
    return copy


_MESSAGES = {
    "missing": "required element is missing",
    "extra_forbidden": "unknown element: FHIR R4 defines no element of this name here",
    "string_type": "expected a string",
    "list_type": "expected an array",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "decimal_type": "expected a number",
    "decimal_parsing": "expected a number",
    "float_type": "expected a number",
}


_SPEC_REGEX = re.compile(r"(\w+) value string does not match spec regex")
_PATTERNS = {r"^[A-Za-z0-9\-.]+$": "not a valid id (letters, digits, '-' and '.')",
             r"^[^\s]+(\s[^\s]+)*$": "not a valid code (no leading, trailing or double spaces)"}


def _message(error: dict) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "json_invalid" and isinstance(value, str):
        return "expected an object, got a string"
    message = _MESSAGES.get(kind) or error["msg"].removeprefix("Value error, ").strip()
    if kind == "value_error" and (match := _SPEC_REGEX.match(message)):
        message = f"not a valid {match.group(1)[0].lower()}{match.group(1)[1:]}"
    elif kind == "string_pattern_mismatch":
        message = _PATTERNS.get((error.get("ctx") or {}).get("pattern"), message)
    if kind in ("missing", "extra_forbidden"):
        return message
    if isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 80:
        message += f" (got {value!r})"
    elif value is None or isinstance(value, (dict, list)):
        message += f" (got {_json_kind(value)})"
    return message


class _Walker:
    """Finds, over a whole resource tree, what fhir.resources' model validators would find in it:
    missing required primitives, competing or missing choice elements, nulls in arrays of objects,
    and embedded resources of an unknown type (which make fhir.resources raise a KeyError)."""
    __slots__ = ("found", "replace")

    def __init__(self) -> None:
        self.found: list[tuple[Loc, str]] = []
        self.replace: set[Loc] = set()

    def walk(self, model: type, data: Any, loc: Loc) -> None:
        if type(data) is not dict:
            return
        shape = _shape(model)
        for name, ext in shape.required:
            if data.get(name) is None and not _has_extension(data.get(ext)):
                self.found.append((loc + (name,), "required element is missing"))
        for prefix, names, required in shape.choices:
            present = [name for name in names if data.get(name) is not None]
            if len(present) > 1:
                self.found.append((loc + (f"{prefix}[x]",),
                                   f"only one of {', '.join(present)} may be present"))
            elif required and not present:
                self.found.append((loc + (f"{prefix}[x]",), f"one of {', '.join(names)} is required"))
        for key, value in data.items():
            child = shape.children.get(key)
            if child is None:
                continue
            child_model, is_list = child
            if is_list and type(value) is list:
                for index, item in enumerate(value):
                    self.item(child_model, item, loc + (key, index))
            elif not is_list:
                self.item(child_model, value, loc + (key,))

    def item(self, model: Any, value: Any, loc: Loc) -> None:
        if value is None:
            if type(loc[-1]) is int:
                self.found.append((loc, "null is not allowed in an array of objects"))
                self.replace.add(loc)
            return
        if model is _ANY_RESOURCE:
            if type(value) is not dict:
                return
            resource_type = value.get("resourceType")
            model = model_class(resource_type)
            if model is None:
                if resource_type is not None:
                    self.found.append((loc + ("resourceType",), f"unknown resource type {resource_type!r}"))
                    self.replace.add(loc)
                return
        self.walk(model, value, loc)


def _has_extension(value: Any) -> bool:
    return type(value) is dict and bool(value.get("extension"))


_ANY_RESOURCE = object()


@dataclass(slots=True)
class _Shape:
    children: dict[str, tuple[Any, bool]]  # JSON name -> (model or _ANY_RESOURCE, is a list)
    required: list[tuple[str, str]]  # (JSON name, JSON name of its _extension sibling)
    choices: list[tuple[str, list[str], bool]]  # (prefix, JSON names, one is required)


_SHAPES: dict[type, _Shape] = {}


def _shape(model: type) -> _Shape:
    shape = _SHAPES.get(model)
    if shape is not None:
        return shape
    fields = model.model_fields
    alias = {name: info.alias or name for name, info in fields.items()}
    by_alias = {json_name: name for name, json_name in alias.items()}
    children: dict[str, tuple[Any, bool]] = {}
    resource_base = get_fhir_model_class("Resource")
    for name, info in fields.items():
        fhir_type = _fhir_type(info.annotation)
        if fhir_type is None:
            continue
        child = fhir_type.get_model_klass()
        children[alias[name]] = (_ANY_RESOURCE if child is resource_base else child,
                                 _is_list(info.annotation))
    required = []
    for name, ext in model.get_required_fields(None):  # type: ignore[arg-type]
        json_name = alias.get(by_alias.get(name, name), name)
        required.append((json_name, alias.get(ext, f"_{json_name}") if ext else f"_{json_name}"))
    choices = []
    for prefix, names in model.get_one_of_many_fields(None).items():  # type: ignore[arg-type]
        extra = fields[names[0]].json_schema_extra or {}
        choices.append((prefix, [alias[name] for name in names], extra.get("one_of_many_required") is True))
    shape = _SHAPES[model] = _Shape(children, required, choices)
    return shape


def _fhir_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is None:
        return annotation if isinstance(annotation, type) and hasattr(annotation, "get_model_klass") else None
    for argument in typing.get_args(annotation):
        found = _fhir_type(argument)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    return origin is not None and any(_is_list(argument) for argument in typing.get_args(annotation))


# --------------------------------------------------------------------------------------------------
# the resource graph


@dataclass(eq=False, slots=True)
class Node:
    """A resource of the input, top-level or contained. Nodes compare by identity."""
    resource: dict = field(repr=False)
    resource_type: str
    id: Optional[str]
    full_url: Optional[str]
    path: str  # element path: CarePlan, Bundle.entry[3].resource, Bundle.entry[3].resource.contained[0]
    container: Optional["Node"] = field(default=None, repr=False)
    key: str = ""  # unique in its graph: Goal/abc, CarePlan/cp1#g1, a fullUrl, or the path
    index: int = 0  # position in input order (contained resources right after their container)
    entry: Optional[Entry] = field(default=None, repr=False)  # the entry of a top-level node

    @property
    def root(self) -> "Node":
        """The top-level node: the container of a contained resource, else the node itself."""
        node = self
        while node.container is not None:
            node = node.container
        return node


# [base/]Type/id[/_history/version], the "RESTful URL" of https://hl7.org/fhir/R4/references.html
_RESTFUL = re.compile(
    r"(?:(?P<base>https?://.+)/)?(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?")


@lru_cache(maxsize=4096)
def _restful(url: Optional[str]) -> Optional[tuple[Optional[str], str, str, Optional[str]]]:
    match = _RESTFUL.fullmatch(url) if url else None
    return match.group("base", "type", "id", "version") if match else None  # type: ignore[return-value]


class ResourceGraph:
    """The resources of one input and the references between them, resolved as
    https://hl7.org/fhir/R4/bundle.html#references describes (and a little more liberally: a
    relative reference also finds a resource by type and id when fullUrls don't settle it)."""

    def __init__(self, entries: Iterable[Entry]):
        self.entries: list[Entry] = list(entries)
        self.nodes: list[Node] = []
        self._by_type: dict[str, list[Node]] = {}
        self._by_key: dict[str, Node] = {}
        self._by_url: dict[str, list[Node]] = {}
        self._by_type_id: dict[tuple[str, str], list[Node]] = {}
        self._contained: dict[Node, dict[str, Node]] = {}
        self._all_targets: dict[Node, list[tuple[str, Node]]] = {}
        self._resolved: dict[tuple[str, Optional[str]], Optional[Node]] = {}
        for entry in self.entries:
            self._add_entry(entry)

    def _add_entry(self, entry: Entry) -> None:
        resource = entry.resource
        resource_type = resource["resourceType"]
        rid = resource.get("id")
        if type(rid) is not str or not rid:
            rid = None
        full_url = entry.full_url
        node = Node(resource, resource_type, rid, full_url, entry.element_path, index=len(self.nodes),
                    entry=entry)
        key = f"{resource_type}/{rid}" if rid else full_url
        if not key or key in self._by_key:
            version = _version(resource)
            key = self._unique_key(full_url, f"{resource_type}/{rid}/_history/{version}"
                                   if rid and version else None, node.path)
        node.key = key
        self._add(node)
        if full_url:
            url = full_url.rsplit("/_history/", 1)[0] if "/_history/" in full_url else full_url
            self._by_url.setdefault(url, []).append(node)
        if rid:
            self._by_type_id.setdefault((resource_type, rid), []).append(node)
        contained = resource.get("contained")
        if type(contained) is list:
            local: dict[str, Node] = {}
            for index, item in enumerate(contained):
                if type(item) is not dict or type(item.get("resourceType")) is not str:
                    continue
                cid = item.get("id") if type(item.get("id")) is str else None
                child = Node(item, item["resourceType"], cid, None, f"{node.path}.contained[{index}]",
                             container=node, index=len(self.nodes))
                child.key = self._unique_key(f"{node.key}#{cid}" if cid else None,
                                             f"{node.key}#contained[{index}]", child.path)
                self._add(child)
                if cid and cid not in local:
                    local[cid] = child
            self._contained[node] = local

    def _unique_key(self, *candidates: Optional[str]) -> str:
        for key in candidates:
            if key and key not in self._by_key:
                return key
        return f"{candidates[-1]}#{len(self._by_key)}"

    def _add(self, node: Node) -> None:
        self.nodes.append(node)
        self._by_key[node.key] = node
        self._by_type.setdefault(node.resource_type, []).append(node)

    def by_type(self, resource_type: str) -> list[Node]:
        """Nodes of one type in input order, contained ones included (their ``container`` is set)."""
        return list(self._by_type.get(resource_type, ()))

    def get(self, key: str) -> Optional[Node]:
        return self._by_key.get(key)

    def resolve(self, reference: Optional[str], source: Node) -> Optional[Node]:
        """The node ``reference`` (a Reference.reference string) points to, seen from ``source``;
        None when it points outside the input."""
        if type(reference) is not str or not reference:
            return None
        root = source.root
        if reference[0] == "#":
            return root if reference == "#" else self._contained.get(root, {}).get(reference[1:])
        # an absolute or conditional reference means the same from anywhere, a relative one
        # depends on the base of the source's fullUrl
        relative = "://" not in reference and not reference.startswith("urn:") and "?" not in reference
        base = _base(root.full_url) if relative else None
        try:
            return self._resolved[reference, base]
        except KeyError:
            pass
        found = self._resolve(reference, base)
        self._resolved[reference, base] = found
        return found

    def _resolve(self, reference: str, source_base: Optional[str]) -> Optional[Node]:
        if reference.startswith("urn:"):
            return _first(self._by_url.get(reference))
        if "?" in reference:
            return self._conditional(reference)
        parts = _restful(reference)
        if parts is None:
            return _first(self._by_url.get(reference))  # an absolute URL that is not RESTful
        base, resource_type, rid, version = parts
        base = base or source_base
        if base:
            found = _pick(self._by_url.get(f"{base}/{resource_type}/{rid}"), version)
            if found is not None:
                return found
        # by type and id, skipping resources whose RESTful fullUrl says they live on another server
        candidates = [node for node in self._by_type_id.get((resource_type, rid), ())
                      if not base or _base(node.full_url) in (None, base)]
        return _pick(candidates, version)

    def _conditional(self, reference: str) -> Optional[Node]:
        """``Patient?identifier=system|value``: the one resource of that type with that identifier."""
        resource_type, _, query = reference.partition("?")
        params = parse_qsl(query)
        if not params or any(name != "identifier" for name, _ in params):
            return None
        matches = None
        for _, token in params:
            system, bar, value = token.rpartition("|")
            found = {node for node in self._by_type.get(resource_type, ()) if node.container is None
                     and _has_identifier(node.resource, system if bar else None, value)}
            matches = found if matches is None else matches & found
        return next(iter(matches)) if matches and len(matches) == 1 else None

    def references(self, node: Node) -> list[tuple[str, dict]]:
        """Every Reference in ``node``'s resource (not inside ``contained``: those are nodes of their
        own), in document order, as (element path, the Reference dict: the input's own object)."""
        found: list[tuple[Loc, dict]] = []
        for key, value in node.resource.items():
            if key != "contained" and type(value) in (dict, list):
                _collect_references(value, (key,), found)
        return [(node.path + "".join(f"[{part}]" if type(part) is int else f".{part}" for part in loc), ref)
                for loc, ref in found]

    def referenced(self, node: Node) -> list[Node]:
        """Every node ``node`` refers to (with repeats), for a top-level node its contained
        resources' references included, as they resolve the same from the container. Cached."""
        return [target for _, target in self.reference_targets(node)]

    def reference_targets(self, node: Node) -> list[tuple[str, Node]]:
        """(reference string, the node it resolves to) for every reference in ``node`` that
        resolves, its contained resources' included. Cached."""
        found = self._all_targets.get(node)
        if found is None:
            found = []
            for reference in _reference_strings(node.resource):
                target = self.resolve(reference, node)
                if target is not None:
                    found.append((reference, target))
            self._all_targets[node] = found
        return found

    def targets(self, node: Node, *elements: str) -> list[Node]:
        """The nodes referenced from the given top-level elements of ``node`` (one or many each;
        ``activity.detail.goal`` style paths go through arrays)."""
        found: list[Node] = []
        for element in elements:
            for ref in _elements(node.resource, element.split(".")):
                if type(ref) is dict:
                    target = self.resolve(ref.get("reference"), node)
                    if target is not None:
                        found.append(target)
        return found


_REFERENCE_KEY = b'"reference":"'


def _reference_strings(resource: dict) -> list[str]:
    """Every ``"reference": "..."`` string in the resource, found in its compact JSON (a quote can't
    occur unescaped inside a JSON string, so the key can't be faked); about twice as fast as
    walking the dicts in Python."""
    data = orjson.dumps(resource)
    found = []
    start = data.find(_REFERENCE_KEY)
    while start >= 0:
        start += len(_REFERENCE_KEY)
        end = data.index(b'"', start)
        while data[end - 1] == 0x5C:  # an escaped quote, unless the backslash is itself escaped
            if (end - start - len(data[start:end].rstrip(b"\\"))) % 2 == 0:
                break
            end = data.index(b'"', end + 1)
        raw = data[start:end]
        found.append(orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode())
        start = data.find(_REFERENCE_KEY, end)
    return found


def _collect_references(value: Any, loc: Loc, out: list) -> None:
    if type(value) is dict:
        if type(value.get("reference")) is str:
            out.append((loc, value))
        for key, item in value.items():
            if type(item) in (dict, list):
                _collect_references(item, loc + (key,), out)
    else:
        for index, item in enumerate(value):
            if type(item) in (dict, list):
                _collect_references(item, loc + (index,), out)


def _elements(value: Any, names: list[str]) -> Iterator[Any]:
    if type(value) is list:
        for item in value:
            yield from _elements(item, names)
    elif not names:
        yield value
    elif type(value) is dict:
        item = value.get(names[0])
        if item is not None:
            yield from _elements(item, names[1:])


def _first(nodes: Optional[list[Node]]) -> Optional[Node]:
    return nodes[0] if nodes else None


def _version(resource: dict) -> Optional[str]:
    meta = resource.get("meta")
    version = meta.get("versionId") if type(meta) is dict else None
    return version if type(version) is str else None


def _pick(nodes: Optional[list[Node]], version: Optional[str]) -> Optional[Node]:
    """The first node of that version (or, if none says which version it is, the first)."""
    if not nodes:
        return None
    if version is None:
        return nodes[0]
    for node in nodes:
        if _version(node.resource) == version:
            return node
    for node in nodes:
        if _version(node.resource) is None:
            return node
    return None


def _base(full_url: Optional[str]) -> Optional[str]:
    parts = _restful(full_url)
    return parts[0] if parts else None


def _has_identifier(resource: dict, system: Optional[str], value: str) -> bool:
    identifiers = resource.get("identifier")
    if type(identifiers) is dict:
        identifiers = [identifiers]
    if type(identifiers) is not list:
        return False
    return any(type(item) is dict and item.get("value") == value
               and (system is None or (item.get("system") or "") == system) for item in identifiers)


# --------------------------------------------------------------------------------------------------
# case groups

CASE_TYPES = frozenset({"Patient", "CarePlan", "Goal", "ServiceRequest", "Condition", "Task", "CareTeam"})
MAPPED_TYPES = CASE_TYPES | {"Practitioner", "Organization", "PractitionerRole"}
# The element naming who a resource is about, per case type.
SUBJECT = {"CarePlan": "subject", "Goal": "subject", "ServiceRequest": "subject",
           "Condition": "subject", "Task": "for", "CareTeam": "subject"}
# Which references between case resources put the target in the source's case.
_FOLLOW = {
    "CarePlan": ("goal", "activity.detail.goal", "addresses", "activity.reference",
                 "activity.outcomeReference", "careTeam"),
    "Goal": ("addresses",),
    "ServiceRequest": ("reasonReference",),
    "Task": ("focus",),
}
_FOLLOWED_TYPES = frozenset({"Goal", "Condition", "ServiceRequest", "Task", "CareTeam"})


@dataclass(eq=False, slots=True)
class CaseGroup:
    """The resources that make one case record. ``subject`` is the subject reference string when
    the patient is not in the input (``patient`` is then None)."""
    careplan: Optional[Node] = None
    patient: Optional[Node] = None
    goals: list[Node] = field(default_factory=list)
    conditions: list[Node] = field(default_factory=list)
    service_requests: list[Node] = field(default_factory=list)
    tasks: list[Node] = field(default_factory=list)
    care_teams: list[Node] = field(default_factory=list)
    others: list[Node] = field(default_factory=list)
    subject: Optional[str] = None

    def nodes(self) -> list[Node]:
        """Every node of the group, in input order."""
        found = [node for node in (self.careplan, self.patient) if node is not None]
        for nodes in (self.goals, self.conditions, self.service_requests, self.tasks, self.care_teams,
                      self.others):
            found += nodes
        return sorted(found, key=_index)


_LISTS = {"Goal": "goals", "Condition": "conditions", "ServiceRequest": "service_requests",
          "Task": "tasks", "CareTeam": "care_teams"}


def _index(node: Node) -> int:
    return node.index


def group_cases(graph: ResourceGraph) -> list[CaseGroup]:
    """One group per CarePlan; then one per Patient for what no plan took (or a Patient on its
    own); then, so nothing is dropped, one per subject reference for the rest (a Task whose
    ServiceRequest is absent, a Goal whose patient is not in the input)."""
    links = _Links(graph)
    groups: list[CaseGroup] = []
    claimed: set[Node] = set()
    with_plan: set[Node] = set()
    for plan in graph.by_type("CarePlan"):
        if plan.container is not None:
            continue
        patient, subject = _subject(graph, plan)
        group = _build(graph, links, [plan], patient, subject)
        group.careplan = plan
        groups.append(group)
        claimed.update(group.nodes())
        if patient is not None:
            with_plan.add(patient)

    rest = [node for node in graph.nodes if node.container is None and node.resource_type in SUBJECT
            and node.resource_type != "CarePlan" and node not in claimed]
    by_subject: dict[Any, list[Node]] = {}
    for node in rest:
        patient, subject = _subject(graph, node)
        by_subject.setdefault(patient if patient is not None else subject, []).append(node)
    for patient in graph.by_type("Patient"):
        if patient.container is not None:
            continue
        seeds = [node for node in by_subject.pop(patient, ()) if node not in claimed]
        if not seeds and patient in with_plan:
            continue
        group = _build(graph, links, seeds, patient, None)
        groups.append(group)
        claimed.update(group.nodes())
    for key, seeds in by_subject.items():  # subjects not in the input, or contained patients
        seeds = [node for node in seeds if node not in claimed]
        if not seeds:
            continue
        if isinstance(key, Node):
            group = _build(graph, links, seeds, key, None)
        else:
            group = _build(graph, links, seeds, None, key)
        groups.append(group)
        claimed.update(group.nodes())
    return groups


def unmapped(graph: ResourceGraph, groups: Iterable[CaseGroup]) -> list[Node]:
    """The top-level resources no group took (a MessageHeader, a Provenance, an Observation or a
    Practitioner nothing in a case refers to): for the caller to report, never to drop silently."""
    claimed = {node for group in groups for node in group.nodes()}
    return [node for node in graph.nodes if node.container is None and node not in claimed]


def _subject(graph: ResourceGraph, node: Node) -> tuple[Optional[Node], Optional[str]]:
    """(the Patient node, None) or (None, the subject reference string, "" when there is none)."""
    ref = node.resource.get(SUBJECT[node.resource_type])
    if type(ref) is not dict:
        return None, ""
    target = graph.resolve(ref.get("reference"), node)
    if target is not None and target.resource_type == "Patient":
        return target, None
    reference = ref.get("reference")
    if type(reference) is str:
        return None, reference
    identifier = ref.get("identifier")
    if type(identifier) is dict:
        return None, f"{identifier.get('system') or ''}|{identifier.get('value') or ''}"
    return None, ""


class _Links:
    """Reverse links: Tasks by the resource they focus on or are based on, subtasks by parent Task,
    ServiceRequests by the plan or request they are based on."""

    def __init__(self, graph: ResourceGraph):
        self.reverse: dict[Node, list[Node]] = {}
        for task in graph.by_type("Task"):
            for target in graph.targets(task, "focus", "basedOn", "partOf"):
                self.reverse.setdefault(target, []).append(task)
        for request in graph.by_type("ServiceRequest"):
            for target in graph.targets(request, "basedOn"):
                self.reverse.setdefault(target, []).append(request)


def _build(graph: ResourceGraph, links: _Links, seeds: list[Node], patient: Optional[Node],
           subject: Optional[str]) -> CaseGroup:
    group = CaseGroup(patient=patient, subject=subject)
    members: set[Node] = set(seeds)
    if patient is not None:
        members.add(patient)
    queue = list(seeds)
    while queue:
        node = queue.pop()
        targets = graph.targets(node, *_FOLLOW.get(node.resource_type, ()))
        targets += links.reverse.get(node, ())
        for target in targets:
            if target not in members and target.resource_type in _FOLLOWED_TYPES:
                members.add(target)
                queue.append(target)
    # whatever else the case refers to, and what that refers to: practitioners, organizations, ...
    queue = list(members)
    while queue:
        for target in graph.referenced(queue.pop()):
            if target not in members and target.resource_type not in CASE_TYPES:
                members.add(target)
                queue.append(target)
    for node in sorted(members, key=_index):
        name = _LISTS.get(node.resource_type)
        if name is not None:
            getattr(group, name).append(node)
        elif node.resource_type not in ("CarePlan", "Patient"):
            group.others.append(node)
    return group
