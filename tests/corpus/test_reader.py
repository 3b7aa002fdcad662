"""The training reader: a verified, deterministic stream of (input, label) batches, the same in
any process, so the first and the last pipeline stage of a pool see identical data."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.errors import CorpusInputError, ShardFormatError
from corpus.prepare import prepare
from corpus.reader import DatasetReader
from protocol.errors import IntegrityError, NotAuthorized
from protocol.identity import Identity
from storage.local import LocalStore
from storage.manifest import sign, verify
from tests.corpus.conftest import make_corpus, small_options, small_sources

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    make_corpus(tmp / "corpus")
    store = LocalStore(tmp / "store")
    identity = Identity.generate()
    result = prepare(small_sources(tmp / "corpus"), small_options(), store=store, identity=identity)
    return store, result.dataset_cid, identity, result.manifest


def digest(reader, steps):
    h = hashlib.sha256()
    for step in range(steps):
        x, y = reader.batch(step)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()


def test_batches_are_shifted_pairs_of_int64(dataset):
    store, cid, identity, manifest = dataset
    reader = DatasetReader(store, cid, batch_size=8, seed=3, trusted={identity.public_key})
    x, y = reader.batch(0)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < manifest.vocab_size


def test_same_seed_same_stream_other_seed_other_stream(dataset):
    store, cid, *_ = dataset
    a = DatasetReader(store, cid, batch_size=8, seed=3)
    b = DatasetReader(store, cid, batch_size=8, seed=3)
    assert digest(a, 5) == digest(b, 5)
    assert digest(DatasetReader(store, cid, batch_size=8, seed=4), 5) != digest(a, 5)
    # Random access equals the iterator, so a resumed reader carries on where it stopped.
    it = iter(DatasetReader(store, cid, batch_size=8, seed=3))
    first = [next(it) for _ in range(4)]
    resumed = DatasetReader(store, cid, batch_size=8, seed=3)
    resumed.skip(2)
    assert torch.equal(next(iter(resumed))[0], first[2][0])
    assert torch.equal(a.batch(3)[0], first[3][0])


def test_two_processes_see_the_identical_stream(dataset, tmp_path):
    """What the first and the last pipeline stage rely on: no shared state, same batches."""
    store, cid, *_ = dataset
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import hashlib\n"
        "from storage.local import LocalStore\n"
        "from corpus.reader import DatasetReader\n"
        "from tests.corpus.test_reader import digest\n"
        f"r = DatasetReader(LocalStore({str(store.root)!r}), {cid!r}, batch_size=8, seed=11)\n"
        "r.skip(0)\n"
        "print(digest(r, 30))\n"
    )
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)]
    assert outs[0] == outs[1] == digest(DatasetReader(store, cid, batch_size=8, seed=11), 30)


def test_one_epoch_visits_every_sequence_once(dataset):
    store, cid, *_ = dataset
    reader = DatasetReader(store, cid, batch_size=7, seed=5, window=2)
    n = reader.sequences
    seen = np.concatenate([reader.positions(s) for s in range(-(-n // 7))])[:n]
    assert len({tuple(p) for p in seen.tolist()}) == n
    # The next epoch is another order of the same sequences.
    nxt = np.concatenate([reader.positions(s) for s in range(n // 7, n // 7 + 3)])
    assert len(nxt) == 21


def test_the_order_of_assigned_shards_does_not_matter(dataset):
    store, cid, _, manifest = dataset
    train = [s.cid for s in manifest.shards if s.split == "train"]
    a = DatasetReader(store, cid, batch_size=4, seed=1, shard_cids=train[:3])
    b = DatasetReader(store, cid, batch_size=4, seed=1, shard_cids=list(reversed(train[:3])))
    assert digest(a, 10) == digest(b, 10)
    assert a.sequences == sum(s.sequences for s in manifest.shards if s.cid in train[:3])


def test_replicas_split_one_stream(dataset):
    store, cid, *_ = dataset
    whole = DatasetReader(store, cid, batch_size=4, seed=2)
    r0 = DatasetReader(store, cid, batch_size=4, seed=2, replica=0, replicas=2)
    r1 = DatasetReader(store, cid, batch_size=4, seed=2, replica=1, replicas=2)
    assert torch.equal(r0.batch(1)[0], whole.batch(2)[0])
    assert torch.equal(r1.batch(1)[0], whole.batch(3)[0])


def test_validation_split_and_bad_assignments(dataset):
    store, cid, _, manifest = dataset
    val = DatasetReader(store, cid, batch_size=2, seed=0, split="val")
    assert val.sequences == sum(s.sequences for s in manifest.shards if s.split == "val")
    val_cid = next(s.cid for s in manifest.shards if s.split == "val")
    with pytest.raises(CorpusInputError, match=f"shard {val_cid} is not a train shard"):
        DatasetReader(store, cid, batch_size=2, seed=0, shard_cids=[val_cid])
    with pytest.raises(CorpusInputError, match="batch_size"):
        DatasetReader(store, cid, batch_size=0, seed=0)


def test_a_manifest_from_an_untrusted_signer_is_refused(dataset):
    store, cid, *_ = dataset
    with pytest.raises(NotAuthorized):
        DatasetReader(store, cid, batch_size=2, seed=0, trusted={Identity.generate().public_key})


def test_a_corrupted_shard_is_caught_by_its_cid(dataset, tmp_path):
    """Bit rot or tampering on disk: the store's hash check refuses the shard before it is parsed."""
    store, cid, _, manifest = dataset
    copy = LocalStore(tmp_path / "copy")
    for info in store.list():
        copy.put_bytes(store.get_bytes(info.cid))
    victim = next(s.cid for s in manifest.shards if s.split == "train")
    path = copy.path_of(victim)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = DatasetReader(copy, cid, batch_size=4, seed=0, shard_cids=[victim])
    with pytest.raises(IntegrityError, match=victim):
        reader.batch(0)


def test_a_signed_manifest_that_lies_about_its_shards_is_caught(dataset):
    """An operator signs a manifest whose vocabulary is smaller than the ids in its shards."""
    store, cid, identity, manifest = dataset
    lying = manifest.model_copy(update={"vocab_size": 10})
    lying_cid = store.put_bytes(sign(lying, identity))
    verify(store.get_bytes(lying_cid))  # the signature is fine: only the contents are wrong
    reader = DatasetReader(store, str(lying_cid), batch_size=4, seed=0)
    with pytest.raises(ShardFormatError, match="outside the vocabulary of 10"):
        reader.verify_all()
