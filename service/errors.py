"""Typed errors. Each carries its HTTP status and FHIR issue code; one place (the API's error
handlers, the command line) turns them into responses, so no other module decides how an error looks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input: where (a field path such as ``goals.2.status`` or a FHIR element
    path such as ``Bundle.entry[3].resource.status``) and what."""
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class CasebridgeError(Exception):
    status = 500
    fhir_code = "exception"
    title = "Internal error"

    def __init__(self, message: str = "", problems: Iterable[Problem] = ()):
        self.problems = list(problems)
        super().__init__(message or self.title)

    @property
    def message(self) -> str:
        return str(self.args[0])


class Invalid(CasebridgeError):
    """The input is not well formed (bad JSON, a field of the wrong type, invalid FHIR)."""
    status = 400
    fhir_code = "invalid"
    title = "Invalid input"


class Unprocessable(CasebridgeError):
    """The input is well formed but breaks a rule of the case record."""
    status = 422
    fhir_code = "processing"
    title = "Unprocessable input"


class NotFound(CasebridgeError):
    status = 404
    fhir_code = "not-found"
    title = "Not found"


class Conflict(CasebridgeError):
    status = 412
    fhir_code = "conflict"
    title = "Version conflict"


class AlreadyExists(CasebridgeError):
    """A create names an id that is already taken."""
    status = 409
    fhir_code = "duplicate"
    title = "Already exists"


class PartnerUnavailable(CasebridgeError):
    """A partner this request had to ask could not be reached, or answered with an error."""
    status = 502
    fhir_code = "transient"
    title = "Partner unavailable"


class Gone(CasebridgeError):
    """The case behind it was entered in error: kept, but no longer served."""
    status = 410
    fhir_code = "deleted"
    title = "Gone"


class NotSupported(CasebridgeError):
    status = 405
    fhir_code = "not-supported"
    title = "Not supported"
