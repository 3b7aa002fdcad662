"""The committed stubs are what protoc makes from panal.proto."""

from protocol.codegen import stale_files


def test_regenerating_stubs_changes_nothing():
    assert stale_files() == [], "run `make proto` and commit the regenerated stubs"
