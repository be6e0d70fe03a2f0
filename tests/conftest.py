"""Shared test setup.

Under CI (``CI=true``) a skipped test fails, with the skip's reason: there a skip means something the
tests need (the FHIR example corpus, a service) is missing, and a green run would hide it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    if _in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {_skip_reason(report)}"
    return report


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The published FHIR R4 examples beside the repository (``../shared/corpus``)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
    if not path.is_dir():
        pytest.skip(f"the FHIR example corpus is missing: {path}")
    return path
