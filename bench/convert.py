"""Conversion speed, printed as figures (run: python bench/convert.py [--rounds N]).

A realistic case (1 client, 1 plan, 4 needs, 5 goals, 8 services/referrals, 10 notes) converted both
ways, next to the floors it is measured against, all in the same run:
  orjson      loads + dumps of the same FHIR bytes (the cost of touching the JSON at all)
  validate    fhir.resources R4B validation of those bytes (what reading FHIR safely costs anyway)
Targets: to-FHIR within 10x of orjson, with output that is still valid; from-FHIR within 1.2x of
validate-only.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import orjson
from fhir.resources.R4B.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mappings import fhir_input  # noqa: E402
from mappings.export import case_bundle  # noqa: E402
from mappings.importer import import_graph  # noqa: E402
from service import schemas, services  # noqa: E402

SAMPLE = ROOT / "tests" / "fixtures" / "cases" / "realistic.json"


def timed(fn, rounds: int) -> float:
    """Median µs per call over ``rounds`` calls, in batches so the clock's resolution does not matter."""
    fn()
    batch = max(1, rounds // 20)
    samples = []
    gc.collect()
    for _ in range(max(1, rounds // batch)):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def from_fhir(raw: bytes):
    entries = fhir_input.parse(raw)
    problems = fhir_input.validate(entries)
    if problems:
        raise SystemExit(f"invalid input: {problems[:3]}")
    return import_graph(fhir_input.ResourceGraph(entries)).cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    rounds = args.rounds

    case_json_bytes = SAMPLE.read_bytes()
    case = schemas.load_case(orjson.loads(case_json_bytes))
    fhir_bytes = orjson.dumps(case_bundle(case))
    services.check_output(orjson.loads(fhir_bytes))  # the output being timed is valid FHIR
    counts = (len(case.needs), len(case.goals), len(case.services), len(case.notes))

    to_fhir = timed(lambda: orjson.dumps(case_bundle(case)), rounds)
    to_fhir_from_json = timed(lambda: orjson.dumps(case_bundle(schemas.load_case(orjson.loads(case_json_bytes)))),
                              rounds)
    orjson_floor = timed(lambda: orjson.dumps(orjson.loads(fhir_bytes)), rounds)
    slow_rounds = max(10, rounds // 10)
    validate_only = timed(lambda: Bundle.model_validate(orjson.loads(fhir_bytes)), slow_rounds)
    validate_dump = timed(lambda: Bundle.model_validate(orjson.loads(fhir_bytes)).model_dump_json(), slow_rounds)
    from_fhir_us = timed(lambda: from_fhir(fhir_bytes), slow_rounds)
    from_fhir_json = timed(lambda: [schemas.dump_case(c) for c in from_fhir(fhir_bytes)], slow_rounds)
    back = from_fhir(fhir_bytes)[0]

    print(f"case: {counts[0]} needs, {counts[1]} goals, {counts[2]} services/referrals, {counts[3]} notes; "
          f"FHIR bundle {len(fhir_bytes)} bytes, {len(orjson.loads(fhir_bytes)['entry'])} resources")
    print(f"round trip gives back the same record: {back == case}")
    print(f"{'':44}{'µs/case':>10}")
    rows = [
        ("to-FHIR (case record → FHIR JSON bytes)", to_fhir),
        ("  same, starting from case-record JSON bytes", to_fhir_from_json),
        ("orjson loads+dumps of the FHIR bytes", orjson_floor),
        ("from-FHIR (FHIR JSON bytes → validated → records)", from_fhir_us),
        ("  same, ending as case-record JSON", from_fhir_json),
        ("fhir.resources R4B validate-only", validate_only),
        ("fhir.resources R4B validate+dump", validate_dump),
    ]
    for label, value in rows:
        print(f"{label:50}{value:>10.0f}")
    print(f"to-FHIR / orjson:          {to_fhir / orjson_floor:5.2f}x   (target ≤ 10x)  "
          f"{'met' if to_fhir <= 10 * orjson_floor else 'NOT met'}")
    print(f"from-FHIR / validate-only: {from_fhir_us / validate_only:5.2f}x   (target ≤ 1.2x) "
          f"{'met' if from_fhir_us <= 1.2 * validate_only else 'NOT met'}")


if __name__ == "__main__":
    main()
