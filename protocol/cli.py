"""`panal keys`: create and inspect Ed25519 identities."""

from __future__ import annotations

import base64
from pathlib import Path

import typer
from rich.console import Console

from protocol.identity import Identity, fingerprint, read_public_key

app = typer.Typer(
    help="Create and inspect Ed25519 identities (node, admin, coordinator).", no_args_is_help=True
)
console = Console()


def _show(public_key: bytes, path: Path) -> None:
    console.print(f"[bold]key[/bold]          {path}")
    console.print(f"[bold]public key[/bold]   {base64.b64encode(public_key).decode()}")
    console.print(f"[bold]fingerprint[/bold]  {fingerprint(public_key)}")


@app.command("new")
def new(
    path: Path = typer.Argument(
        ..., help="Where to write the private key (mode 0600); PATH.pub gets the public key."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key (its identity is lost)."),
) -> None:
    """Create a new identity at PATH."""
    identity = Identity.generate()
    identity.save(path, overwrite=force)
    _show(identity.public_key, path)


@app.command("show")
def show(path: Path = typer.Argument(..., help="A private key file, or its .pub file.")) -> None:
    """Print the public key and fingerprint of the identity at PATH."""
    public_key = read_public_key(path) if path.suffix == ".pub" else Identity.load(path).public_key
    _show(public_key, path)
