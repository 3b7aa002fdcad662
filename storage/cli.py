"""`panal store`: add, fetch, verify and manage content-addressed blobs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from storage.blobstore import BlobStore
from storage.blobstore import Progress as ProgressFn
from storage.cid import CID, InvalidCIDError, cid_of_file
from storage.stores import ENV_VAR, open_store
from storage.verify import Check, verify_tree

app = typer.Typer(help="Content-addressed blobs: CIDs identical to `ipfs add`.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
PROGRESS_MIN_BYTES = 16 * 1024 * 1024


class _State:
    url: str | None = None


def _store() -> BlobStore:
    return open_store(_State.url)


def _cid(text: str) -> CID:
    try:
        return CID.parse(text)
    except InvalidCIDError as e:
        raise typer.BadParameter(f"{text!r} is not a CID: {e}") from e


@app.callback()
def store_options(
    store: str | None = typer.Option(
        None,
        "--store",
        envvar=ENV_VAR,
        help="Store URL: local:PATH (default local:~/.panal/store) or kubo:http://HOST:PORT.",
    ),
) -> None:
    """Content-addressed blobs: CIDs identical to `ipfs add`."""
    _State.url = store


@contextmanager
def _progress(total: int | None, label: str) -> Iterator[ProgressFn | None]:
    """A progress bar on stderr for large transfers; nothing for small ones or when piped."""
    if total is not None and total < PROGRESS_MIN_BYTES or not err.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def add(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="File to add."),
    cid_version: int = typer.Option(0, "--cid-version", min=0, max=1, help="1 for CIDv1 with raw leaves."),
    pin: bool = typer.Option(True, "--pin/--no-pin", help="Keep it through gc (as `ipfs add`)."),
) -> None:
    """Add a file; print its CID (the last line)."""
    with _store() as store, _progress(path.stat().st_size, f"adding {path.name}") as progress:
        cid = store.put_file(path, cid_version=cid_version, pin=pin, progress=progress)
    out.print(str(cid), highlight=False)


@app.command()
def cat(cid: str = typer.Argument(..., help="CID to print to stdout.")) -> None:
    """Write a blob to stdout (local store: verified before the first byte is written)."""
    with _store() as store:
        for block in store.iter_chunks(_cid(cid)):
            sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()


@app.command()
def get(
    cid: str = typer.Argument(..., help="CID to fetch."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write it (atomically, once verified)."),
) -> None:
    """Fetch a blob to a file; nothing is written unless it verifies."""
    c = _cid(cid)
    with _store() as store:
        size = store.stat(c).size
        with _progress(size, f"fetching {c}") as progress:
            store.get_file(c, output, progress=progress)
    err.print(f"wrote {output} ({size} bytes)")


@app.command()
def verify(
    cid: str = typer.Argument(..., help="CID of a blob or manifest."),
    trust: list[Path] = typer.Option(  # noqa: B006 - typer needs a list default
        [], "--trust", help="Public key file (.pub) a manifest must be signed by; repeatable."
    ),
) -> None:
    """Verify a blob, and for a manifest its signature and every blob it names. Exit 0 only if all verify."""
    from protocol.identity import read_public_key

    trusted = {read_public_key(p) for p in trust} or None
    table = Table("", "role", "CID", "detail")

    def show(check: Check) -> None:
        mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
        table.add_row(mark, "  " * check.depth + check.role, check.cid, check.detail)

    with _store() as store:
        checks = verify_tree(store, _cid(cid), trusted=trusted, on_check=show)
    out.print(table)
    failed = [c for c in checks if not c.ok]
    if failed:
        err.print(f"[red]{len(failed)} of {len(checks)} blobs failed verification[/red]")
        raise typer.Exit(1)
    out.print(f"all {len(checks)} blobs verified")


@app.command("ls")
def ls() -> None:
    """List the blobs in the store (Kubo: the pinned roots)."""
    table = Table("CID", "bytes", "pinned")
    with _store() as store:
        for info in store.list():
            table.add_row(str(info.cid), f"{info.size:,}", "yes" if info.pinned else "")
    out.print(table)


@app.command()
def pin(cid: str = typer.Argument(...)) -> None:
    """Pin a blob so gc keeps it."""
    with _store() as store:
        store.pin(_cid(cid))
    err.print(f"pinned {cid}")


@app.command()
def unpin(cid: str = typer.Argument(...)) -> None:
    """Unpin a blob (gc may then remove it)."""
    with _store() as store:
        store.unpin(_cid(cid))
    err.print(f"unpinned {cid}")


@app.command()
def gc() -> None:
    """Remove every unpinned blob."""
    with _store() as store:
        removed = store.gc()
    for c in removed:
        out.print(str(c), highlight=False)
    err.print(f"removed {len(removed)} unpinned blobs")


@app.command("cid")
def cid_command(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    cid_version: int = typer.Option(0, "--cid-version", min=0, max=1, help="1 for CIDv1 with raw leaves."),
) -> None:
    """Print only the CID `ipfs add --only-hash` would print for a file; stores nothing."""
    print(cid_of_file(path, cid_version=cid_version))
