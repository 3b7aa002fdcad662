"""Identities on disk: created 0600, refused when exposed, never printed."""

import os
import stat

import pytest
from typer.testing import CliRunner

from panal.cli import app
from protocol.errors import IdentityError
from protocol.identity import Identity, fingerprint, load_or_create, read_public_key


def test_key_is_created_0600_and_loads_back(tmp_path):
    ident = Identity.generate()
    path = ident.save(tmp_path / "keys" / "node.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public_key == ident.public_key
    assert read_public_key(f"{path}.pub") == ident.public_key


def test_umask_cannot_widen_key_permissions(tmp_path):
    old = os.umask(0)
    try:
        path = Identity.generate().save(tmp_path / "node.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_story_key_file_with_loose_permissions_is_refused(tmp_path, mode):
    """An operator copied the key with `cp` and a default umask: panal refuses to use it."""
    path = Identity.generate().save(tmp_path / "node.key")
    path.chmod(mode)
    with pytest.raises(IdentityError, match=r"chmod 600"):
        Identity.load(path)


def test_existing_key_is_never_overwritten_silently(tmp_path):
    path = Identity.generate().save(tmp_path / "node.key")
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)


def test_garbage_key_file_gives_clear_error(tmp_path):
    path = tmp_path / "node.key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a panal Ed25519 private key"):
        Identity.load(path)


def test_missing_key_says_how_to_make_one(tmp_path):
    with pytest.raises(IdentityError, match="panal keys new"):
        Identity.load(tmp_path / "absent.key")


def test_repr_never_shows_the_secret():
    ident = Identity.generate()
    assert ident.seed.hex() not in repr(ident)
    assert ident.fingerprint in repr(ident)


def test_fingerprint_is_stable_and_short():
    ident = Identity(bytes(range(32)))
    assert fingerprint(ident.public_key) == ident.fingerprint
    assert len(ident.fingerprint) == 32
    assert Identity(bytes(range(32))).fingerprint == ident.fingerprint


def test_load_or_create_reuses(tmp_path):
    a, created_a = load_or_create(tmp_path / "k")
    b, created_b = load_or_create(tmp_path / "k")
    assert created_a and not created_b and a.public_key == b.public_key


def test_cli_keys_new_and_show(tmp_path):
    runner = CliRunner()
    path = tmp_path / "admin.key"
    made = runner.invoke(app, ["keys", "new", str(path)])
    assert made.exit_code == 0, made.output
    fp = Identity.load(path).fingerprint
    assert fp in made.output
    shown = runner.invoke(app, ["keys", "show", str(path)])
    assert shown.exit_code == 0 and fp in shown.output
    shown_pub = runner.invoke(app, ["keys", "show", f"{path}.pub"])
    assert shown_pub.exit_code == 0 and fp in shown_pub.output
    assert Identity.load(path).seed.hex() not in made.output + shown.output
