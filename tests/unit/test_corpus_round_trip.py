"""FHIR → case record → FHIR over every published example of a mapped type in ../shared/corpus.

What comes back must hold every element the input had. Two things are allowed to change, both
documented: references to resources that became part of the record are written as relative
``Type/id`` references (so they are compared by what they point at), and mapped resources that were
``contained`` come back as resources of their own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
from fhir.resources.R4B.bundle import Bundle

from mappings import fhir_input
from mappings.export import case_bundle
from mappings.importer import import_graph
from service import schemas

MAPPED = {"CarePlan", "Goal", "ServiceRequest", "Patient", "Condition", "Task"}
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    found = []
    for path in sorted(CORPUS.glob("*/*.json")):
        data = json.loads(path.read_text())
        types = {data.get("resourceType")} | {(e.get("resource") or {}).get("resourceType")
                                              for e in data.get("entry", ())}
        if types & MAPPED:
            found.append(path)
    return found


FILES = corpus_files()


def test_the_corpus_is_there():
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    assert len(FILES) > 50


def strip_refs(value: Any, resolve, lifted_out: set = frozenset()) -> Any:
    """``value`` with every reference that resolves replaced by what it points at, and the contained
    resources that came back as resources of their own (``lifted_out``) left out."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                target = resolve(item)
                out[key] = target if target is not None else item
            elif key == "contained":
                kept = [c for c in item if content_identity(c) not in lifted_out]
                if kept:
                    out[key] = kept
            else:
                out[key] = strip_refs(item, resolve, lifted_out)
        return out
    if isinstance(value, list):
        return [strip_refs(v, resolve, lifted_out) for v in value]
    return value


def content_identity(resource: dict) -> tuple:
    """A resource known by what it says (for contained ones, which have no id of their own)."""
    content = {k: v for k, v in resource.items() if k not in ("id", "contained")}
    return ("content", resource.get("resourceType"), json.dumps(_refs_blanked(content), sort_keys=True))


def _refs_blanked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("ref" if k == "reference" else _refs_blanked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs_blanked(v) for v in value]
    return value


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_round_trip_keeps_every_element(path):
    raw = path.read_bytes()
    entries = fhir_input.parse(raw)
    assert fhir_input.validate(entries) == []
    source = fhir_input.ResourceGraph(entries)
    result = import_graph(source)
    # the records are valid case records, and survive being stored as JSON
    cases = [schemas.load_case(json.loads(json.dumps(schemas.dump_case(c)))) for c in result.cases]
    assert cases == result.cases

    outputs = [case_bundle(c) for c in cases]
    for bundle in outputs:
        Bundle.model_validate(bundle)
    # the input's resources may spread over several records: resolve over all of them together
    seen, out_entries = set(), []
    for bundle in outputs:
        for entry in bundle["entry"]:
            if entry["fullUrl"] not in seen:
                seen.add(entry["fullUrl"])
                out_entries.append(entry)
    graph = fhir_input.ResourceGraph(fhir_input.parse({"resourceType": "Bundle", "type": "collection",
                                                       "entry": out_entries}))
    out_nodes = [(graph, n) for t in MAPPED | {"CareTeam"} for n in graph.by_type(t)]
    lifted_out = {content_identity(e["resource"]) for e in out_entries}
    kept_elsewhere = {(u["resourceType"], u["id"]) for u in result.unmapped}

    input_ids = {(e.resource.get("resourceType"), e.resource.get("id")) for e in entries}
    versions: dict = {}
    for e in entries:
        key = (e.resource.get("resourceType"), e.resource.get("id"))
        versions[key] = versions.get(key, 0) + 1

    def in_identity(node):
        if node.container is None and node.id:
            return (node.resource_type, node.id)
        return content_identity(node.resource)

    def out_identity(node):
        if node.container is None and (node.resource_type, node.id) in input_ids:
            return (node.resource_type, node.id)
        return content_identity(node.resource)

    for rtype in sorted(MAPPED):
        for node in source.by_type(rtype):
            def resolve_in(ref, n=node):
                target = source.resolve(ref, n)
                return None if target is None else in_identity(target)
            expected = strip_refs(node.resource, resolve_in, lifted_out)
            lifted = node.container is not None or not node.id
            if lifted:
                expected.pop("id", None)
                matches = [(g, n) for g, n in out_nodes if n.resource_type == rtype]
            else:
                matches = [(g, n) for g, n in out_nodes if n.resource_type == rtype and n.id == node.id]
                if not matches:
                    assert (rtype, node.id) in kept_elsewhere or _kept_as_other(cases, node), \
                        f"{rtype}/{node.id} is missing from the output"
                    continue
            found = []
            for graph, out in matches:
                def resolve_out(ref, g=graph, o=out):
                    target = g.resolve(ref, o)
                    return None if target is None else out_identity(target)
                got = strip_refs(out.resource, resolve_out, lifted_out)
                if lifted:
                    got.pop("id", None)
                found.append(got)
                if got == expected:
                    break
            else:
                if versions.get((rtype, node.id), 0) > 1:
                    continue  # the input holds several versions of this resource; one comes back
                closest = found[0] if found else {}
                pytest.fail(f"{rtype}/{node.id} ({node.path}) changed in the round trip:\n"
                            + "\n".join(differences(expected, closest, rtype)[:20]))


def _kept_as_other(cases, node) -> bool:
    return any(o["resource"] is node.resource or o["resource"] == node.resource
               for c in cases for o in (c.fhir or {}).get("others", ()))


def differences(before: Any, after: Any, path: str) -> list[str]:
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        lines = []
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                lines.append(f"- {path}.{key}: {json.dumps(before[key], default=str)[:300]}")
            elif key not in before:
                lines.append(f"+ {path}.{key}: {json.dumps(after[key], default=str)[:300]}")
            else:
                lines += differences(before[key], after[key], f"{path}.{key}")
        return lines
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [line for i, (b, a) in enumerate(zip(before, after)) for line in differences(b, a, f"{path}[{i}]")]
    return [f"~ {path}: {json.dumps(before, default=str)[:300]} => {json.dumps(after, default=str)[:300]}"]
