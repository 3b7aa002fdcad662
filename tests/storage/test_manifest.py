"""Manifests: canonical, signed, and walked by verification."""

import json

import pytest

from protocol.errors import MalformedMessage, NotAuthorized, SignatureError
from protocol.identity import Identity
from storage import manifest
from storage.local import LocalStore
from storage.manifest import CheckpointManifest, DatasetManifest, ShardEntry, StageEntry, UpdateManifest
from storage.verify import verify_tree

OWNER = Identity(bytes(range(32)))


def dataset(store):
    tok = store.put_bytes(b'{"tokenizer": true}', pin=True)
    shards = [store.put_bytes(bytes([i]) * 1000, pin=True) for i in range(3)]
    return DatasetManifest(
        name="demo",
        tokenizer_cid=str(tok),
        vocab_size=512,
        seq_len=64,
        token_dtype="uint16",
        shards=[
            ShardEntry(cid=str(c), split="train" if i else "val", tokens=500, sequences=7)
            for i, c in enumerate(shards)
        ],
    )


def test_sign_verify_and_canonical_form(tmp_path):
    body = dataset(LocalStore(tmp_path))
    data = manifest.sign(body, OWNER)
    assert data == manifest.canonical_json(json.loads(data))  # stored canonically
    signed = manifest.verify(data, trusted={OWNER.public_key})
    assert signed.body == body and signed.signer_id == OWNER.fingerprint and signed.kind == "dataset"


def test_story_a_shard_cid_is_swapped_in_a_signed_manifest(tmp_path):
    """Someone edits a dataset manifest to point at their own shard: the signature breaks."""
    store = LocalStore(tmp_path)
    doc = json.loads(manifest.sign(dataset(store), OWNER))
    doc["body"]["shards"][0]["cid"] = str(store.put_bytes(b"poison"))
    with pytest.raises(SignatureError):
        manifest.verify(manifest.canonical_json(doc))


def test_untrusted_signer_and_malformed_documents(tmp_path):
    data = manifest.sign(dataset(LocalStore(tmp_path)), Identity.generate())
    with pytest.raises(NotAuthorized):
        manifest.verify(data, trusted={OWNER.public_key})
    with pytest.raises(MalformedMessage, match="not JSON"):
        manifest.verify(b"{nope")
    doc = json.loads(data)
    doc["body"]["vocab_size"] = -1
    with pytest.raises(MalformedMessage, match="vocab_size"):
        manifest.verify(manifest.canonical_json(doc))
    doc = json.loads(data)
    doc["body"]["tokenizer_cid"] = "QmNotACid"
    with pytest.raises(MalformedMessage, match="tokenizer_cid"):
        manifest.verify(manifest.canonical_json(doc))


def test_update_manifest_binds_job_and_round():
    update = UpdateManifest(
        job="j",
        round=4,
        pool="a",
        stage=1,
        node=OWNER.fingerprint,
        cid="QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN",
        sha256="0" * 64,
        tokens=10,
        loss=2.5,
        norm=0.1,
    )
    doc = json.loads(manifest.sign(update, OWNER))
    assert manifest.verify(manifest.canonical_json(doc)).body == update
    doc["body"]["round"] = 5  # a replay into a later round
    with pytest.raises(SignatureError):
        manifest.verify(manifest.canonical_json(doc))


def test_verify_tree_walks_checkpoint_chain_and_dataset(tmp_path):
    store = LocalStore(tmp_path)
    ds = store.put_bytes(manifest.sign(dataset(store), OWNER), pin=True)
    stage = store.put_bytes(b"weights", pin=True)

    def ckpt(step, parent):
        return CheckpointManifest(
            job="j",
            round=step,
            step=step,
            model_config_json={"n_layer": 2},
            stages=[StageEntry(stage=0, cid=str(stage), layer_start=0, layer_end=2)],
            parent=parent,
            dataset_cid=str(ds),
        )

    first = store.put_bytes(manifest.sign(ckpt(1, None), OWNER), pin=True)
    second = store.put_bytes(manifest.sign(ckpt(2, str(first)), OWNER), pin=True)
    checks = verify_tree(store, second)
    assert all(c.ok for c in checks)
    assert [c.role for c in checks] == ["root", "stage 0", "parent checkpoint"]
    assert all(c.ok for c in verify_tree(store, ds))
    assert len(verify_tree(store, ds)) == 5  # manifest, tokenizer, 3 shards

    # The stage blob rots on disk: the walk from the newest checkpoint finds it.
    path = store.path_of(stage)
    path.chmod(0o644)
    path.write_bytes(b"weightz")
    bad = [c for c in verify_tree(store, second) if not c.ok]
    assert [c.role for c in bad] == ["stage 0"] and "IntegrityError" in bad[0].detail
