"""Reading inputs: each format, and bad input as a counted skip or a clear error (never silence)."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.errors import CorpusInputError
from corpus.sources import PathSource, ReadLog, ReadOptions, kind_of, parse_input


def read(path, **options):
    log = ReadLog()
    docs = list(PathSource(path, options=ReadOptions(**options)).documents(log))
    return docs, log


def test_directory_walk_is_sorted_and_skips_hidden_and_unknown(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("third")
    (tmp_path / ".hidden.txt").write_text("no")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("no")
    docs, log = read(tmp_path)
    assert [d.text for d in docs] == ["first", "second", "third"]
    assert not log.skipped


def test_formats_by_suffix(tmp_path):
    assert kind_of(tmp_path / "a.jsonl.gz") == "jsonl"
    assert kind_of(tmp_path / "a.ndjson") == "jsonl"
    assert kind_of(tmp_path / "a.parquet") == "parquet"
    assert kind_of(tmp_path / "a.txt.gz") == "text"
    assert kind_of(tmp_path / "a.bin") is None


def test_jsonl_plain_and_gzip_with_a_chosen_field(tmp_path):
    rows = [{"body": "alpha", "n": 1}, {"body": "beta"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gamma"}) + "\n")
    docs, log = read(tmp_path, text_field="body")
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    assert docs[1].origin.endswith("a.jsonl:2")


def test_jsonl_missing_field_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "url": "u"}) + "\n")
    with pytest.raises(CorpusInputError, match=r"a\.jsonl:2: no field 'text' \(fields here: content, url\)"):
        read(path)


def test_jsonl_non_string_field_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": ["a", "list"]}) + "\n")
    with pytest.raises(CorpusInputError, match=r"a\.jsonl:1: field 'text' is a list"):
        read(path)


def test_jsonl_bad_lines_are_counted_skips(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        b'{"text": "good"}\n'
        b"{not json\n"
        b"[1, 2]\n"
        b'{"text": null}\n'
        b'{"text": "bad \xff byte"}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'
    )
    docs, log = read(path)
    assert [d.text for d in docs] == ["good"]
    assert log.skipped == {"invalid_json": 2, "empty": 1, "invalid_utf8": 2}
    assert any("a.jsonl:2: invalid_json" in e for e in log.examples)


def test_invalid_utf8_replaced_when_asked(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")
    docs, log = read(tmp_path / "a.txt")
    assert docs == [] and log.skipped == {"invalid_utf8": 1}
    docs, log = read(tmp_path / "a.txt", encoding_errors="replace")
    assert docs[0].text == "caf\ufffd au lait" and not log.skipped


def test_utf8_bom_is_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    docs, _ = read(tmp_path / "a.txt")
    assert docs[0].text == "hello"


def test_unreadable_file_is_a_counted_skip_with_its_reason(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    os.symlink(tmp_path / "gone.txt", tmp_path / "broken.txt")  # root reads any mode: a dead link fails for all
    docs, log = read(tmp_path)
    assert [d.text for d in docs] == ["fine"]
    assert log.skipped == {"unreadable": 1}
    assert "broken.txt: unreadable (No such file or directory)" in log.examples[0]


def test_too_large_documents_are_skipped(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 100)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "y" * 100}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    docs, log = read(tmp_path, max_doc_bytes=50)
    assert [d.text for d in docs] == ["ok"]
    assert log.skipped == {"too_large": 2}


def test_parquet_column_nulls_and_bad_files(tmp_path):
    pq.write_table(pa.table({"text": ["one", None, "two"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    docs, log = read(tmp_path)
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[1].origin.endswith("a.parquet#2")
    assert log.skipped == {"empty": 1, "unreadable": 1}


def test_parquet_missing_or_non_string_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusInputError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        read(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusInputError, match="not a string column"):
        read(tmp_path / "b.parquet")


def test_missing_input_and_weights(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert parse_input(str(tmp_path / "a.txt")) == (tmp_path / "a.txt", 1.0)
    assert parse_input(f"{tmp_path / 'a.txt'}:2.5") == (tmp_path / "a.txt", 2.5)
    with pytest.raises(CorpusInputError, match="does not exist"):
        parse_input(str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusInputError, match="finite number"):
        parse_input(f"{tmp_path / 'a.txt'}:-1")
    with pytest.raises(CorpusInputError, match="does not exist"):
        PathSource(tmp_path / "nope")
