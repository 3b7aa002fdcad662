"""`panal`: one command, each package's group composed here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from coordinator.cli import admin_app, coordinator_app
from corpus.cli import app as corpus_app
from model.cli import plan_command
from model.config import ModelConfigError
from node.cli import node_app
from panal import __version__
from panal.simulate_cli import simulate_command
from panal.train_cli import train_command
from protocol.cli import app as keys_app
from protocol.errors import ProtocolError
from storage.cli import app as store_app

app = typer.Typer(
    name="panal",
    help="Train large transformers across GPU pools that do not trust each other.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(store_app, name="store")
app.add_typer(corpus_app, name="corpus")
app.command("plan")(plan_command)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(admin_app, name="admin")
app.add_typer(node_app, name="node")
app.command("simulate")(simulate_command)
app.command("train")(train_command)

_err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"panal {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train large transformers across GPU pools that do not trust each other."""


def main() -> None:
    """Entry point: domain errors (bad input, failed checks) become one clear line and exit
    status 1, not a traceback."""
    try:
        app()
    except (ProtocolError, ModelConfigError, FileNotFoundError, FileExistsError) as e:
        _err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
