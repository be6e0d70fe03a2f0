"""The ``casebridge`` command line.

Commands read a file (or ``-`` for standard input), call a use case in ``service.services`` and print
JSON. A problem with the input is printed as ``error: <message>`` followed by one ``  <path>: <message>``
line per problem, with exit status 1; anything unexpected is an ``internal error`` with status 70.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, BinaryIO, NoReturn, TypeVar

import click
import orjson

from service.errors import CasebridgeError

#: exit statuses: the input is wrong (1), casebridge is wrong (70, EX_SOFTWARE)
EXIT_INVALID = 1
EXIT_INTERNAL = 70

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, lines: list[str], status: int) -> NoReturn:
    click.echo(message, err=True)
    for line in lines:
        click.echo(f"  {line}", err=True)
    raise SystemExit(status)


def reports_errors(command: F) -> F:
    """Turn casebridge's errors into a readable list on standard error, never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CasebridgeError as error:
            _fail(f"error: {error.message}", [str(problem) for problem in error.problems], EXIT_INVALID)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the last line of defence: report, don't trace
            _fail(f"internal error: {type(error).__name__}: {error}", [], EXIT_INTERNAL)

    return run  # type: ignore[return-value]


def _write_json(document: object) -> None:
    click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="casebridge", message="%(prog)s %(version)s")
def cli() -> None:
    """casebridge: case records to and from FHIR R4."""


@cli.group()
def convert() -> None:
    """Convert between case records and FHIR R4, without storing anything."""


@convert.command("to-fhir")
@click.argument("source", type=click.File("rb"), default="-", metavar="[FILE|-]")
@click.option("--bundle-type", type=click.Choice(["collection", "transaction"]), default="collection",
              show_default=True, help="The kind of FHIR Bundle to write.")
@click.option("--validate", is_flag=True, help="Also validate the resources against FHIR R4.")
@reports_errors
def to_fhir(source: BinaryIO, bundle_type: str, validate: bool) -> None:
    """Convert a case record (JSON) to a FHIR R4 Bundle."""
    raw = source.read()
    try:
        case_json = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        _fail(f"error: input is not valid JSON: {error}", [], EXIT_INVALID)
    from service import services

    _write_json(services.convert_to_fhir(case_json, bundle_type=bundle_type, validate=validate))


@convert.command("from-fhir")
@click.argument("source", type=click.File("rb"), default="-", metavar="[FILE|-]")
@click.option("--validate", is_flag=True, help="Validate the FHIR input against R4 before converting.")
@reports_errors
def from_fhir(source: BinaryIO, validate: bool) -> None:
    """Convert FHIR R4 (a Bundle or a single resource) to case records."""
    raw = source.read()
    from service import services

    _write_json(services.convert_from_fhir(raw, validate=validate))


def main() -> None:
    """The ``casebridge`` console script."""
    cli(prog_name="casebridge")


if __name__ == "__main__":
    main()
