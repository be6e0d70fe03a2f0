"""pytest fixtures for the test FHIR server.

    from fhir_server.fixtures import fhir_server

    epic = fhir_server("epic", session_ttl=1)      # a fixture named `epic` in this module

    def test_something(epic):
        requests.get(f"{epic.base_url}/CarePlan")

One server process per (profile, options) serves the whole test session, across modules; each test
gets it reset (empty store, zero stats, settings as launched), so tests may call ``control()``
without cleaning up.
"""
from __future__ import annotations

from typing import Any

import pytest

from fhir_server.fhirserver import FhirServer

_servers: dict[tuple, FhirServer] = {}


def shared_server(config: pytest.Config, profile: str = "full", **options: Any) -> FhirServer:
    """The session's server for this profile and these options, started on first use."""
    key = (profile, tuple(sorted(options.items())))
    server = _servers.get(key)
    if server is None or not server.alive():
        server = FhirServer(profile, **options).start()
        _servers[key] = server

        def stop() -> None:
            _servers.pop(key, None)
            server.stop()

        config.add_cleanup(stop)
    return server


def fhir_server(profile: str = "full", **options: Any):
    """A fixture giving the shared, freshly reset FhirServer for ``profile`` and ``options``."""

    @pytest.fixture
    def fixture(request: pytest.FixtureRequest) -> FhirServer:
        server = shared_server(request.config, profile, **options)
        server.reset()
        return server

    fixture.__doc__ = f"The test FHIR server, profile {profile!r}, options {options or 'default'}, reset."
    return fixture
