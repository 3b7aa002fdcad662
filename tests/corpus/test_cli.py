"""`panal corpus` as an operator runs it: the summary, the CID as the last line, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from corpus.cli import app
from corpus.demo import StdlibSource, docstrings, module_name
from corpus.sources import ReadLog
from storage.local import LocalStore
from storage.verify import verify_tree

runner = CliRunner()


def invoke(*args, store, key):
    return runner.invoke(app, [*args, "--store", f"local:{store}", "--key", str(key)], env={"COLUMNS": "200"})


def test_prepare_prints_the_summary_and_the_cid_last(corpus_dir, tmp_path):
    store, key = tmp_path / "store", tmp_path / "keys" / "operator.key"
    args = ["prepare", str(corpus_dir / "texts"), f"{corpus_dir / 'more.jsonl'}:2", "--name", "tiny",
            "--vocab-size", "400", "--seq-len", "32", "--shard-sequences", "256", "--min-chars", "100"]
    result = invoke(*args, store=store, key=key)
    assert result.exit_code == 0, result.stderr + result.stdout
    cid = result.stdout.strip().splitlines()[-1]
    assert cid.startswith("Qm")
    for row in ("filter too_short", "filter symbols", "filter repeated_lines", "exact duplicate", "near duplicate"):
        assert row in result.stdout
    assert "created operator key" in result.stderr and key.exists()
    assert all(c.ok for c in verify_tree(LocalStore(store), cid))

    again = invoke(*args, store=store, key=key)
    assert again.stdout.strip().splitlines()[-1] == cid
    assert "reusing dataset" in again.stderr and "created operator key" not in again.stderr


def test_bad_input_exits_1_with_the_reason(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x" * 300}) + "\n")
    result = invoke("prepare", str(tmp_path / "a.jsonl"), "--name", "n", store=tmp_path / "s", key=tmp_path / "k")
    assert result.exit_code == 1
    assert "a.jsonl:1: no field 'text'" in result.stderr and "--text-field" in result.stderr
    missing = invoke("prepare", str(tmp_path / "nope"), "--name", "n", store=tmp_path / "s", key=tmp_path / "k")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr


def test_the_demo_source_reads_code_and_docstrings(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (lib / "pkg" / "mod.py").write_text(
        '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n        """Method doc."""\n'
    )
    for skipped in ("test", "site-packages", "__pycache__"):
        (lib / skipped).mkdir()
        (lib / skipped / "x.py").write_text("x = 1\n")
    source = StdlibSource(lib)
    docs = list(source.documents(ReadLog()))
    assert [d.origin.removeprefix(str(lib)) for d in docs] == [
        "/pkg/__init__.py", "/pkg/__init__.py (docstrings)", "/pkg/mod.py", "/pkg/mod.py (docstrings)",
    ]
    assert docs[3].text == (
        "Documentation of the module pkg.mod.\n\nModule doc.\n\nclass A:\nClass doc.\n\ndef A.f:\nMethod doc."
    )
    assert module_name(lib, lib / "pkg" / "__init__.py") == "pkg"
    assert docstrings("def broken(:\n", "m") is None
    assert len(StdlibSource(lib, include_tests=True).files) == 3
