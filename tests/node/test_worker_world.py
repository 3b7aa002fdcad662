"""A pool whose DeepSpeed world cannot form: the worker says why and exits — it never hangs.

The worker is the real one, as its own OS process, given an assignment for rank 0 of a
world of 2 whose other rank never comes (a peer that is down or unreachable). No
coordinator is needed to get there: the worker joins the world before its first call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from google.protobuf.json_format import MessageToJson

from protocol import panal_pb2 as pb
from protocol import tls
from protocol.identity import Identity
from tests.model.pool import free_port

WORLD_TIMEOUT_S = 8


def _train_shard(store_url, dataset):
    from storage import manifest
    from storage.stores import open_store

    body = manifest.verify(open_store(store_url).get_bytes(dataset)).body
    return next(s.cid for s in body.shards if s.split == "train")


def test_a_world_that_cannot_form_is_reported_with_the_reason(tmp_path, small_dataset):
    store, dataset = small_dataset
    home = tmp_path / "node"
    home.mkdir()
    ident = Identity.generate()
    ident.save(home / "node.key")
    ca = tls.make_ca()
    tls.save(tls.make_client_cert(ca, ident.fingerprint), home / "node.pem", home / "node-tls.key")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    spec = {"name": "j", "dataset": dataset, "pools": ["p"], "stages": 2, "model": {"preset": "tiny"}}
    from coordinator.job import JobSpec

    a = pb.Assignment(
        job="j",
        round=0,
        pool="p",
        stage=0,
        num_stages=2,
        world=pb.DistributedWorld(
            rank=0,
            world_size=2,
            master_address="127.0.0.1",
            master_port=free_port(),
            backend="gloo",
            timeout_s=WORLD_TIMEOUT_S,
        ),
        dataset_cid=dataset,
        shard_cids=[_train_shard(store, dataset)],
        inner_steps=1,
        epoch=1,
        job_spec_json=JobSpec.model_validate(spec).to_json(),
        model_config_json=json.dumps(JobSpec.model_validate(spec).gpt_config().to_dict()),
    )
    (home / "assignment.json").write_text(MessageToJson(a))
    (home / "worker.json").write_text(
        json.dumps({"coordinator": "127.0.0.1:1", "ca": str(tmp_path / "ca.pem"), "store": store})
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "node.worker", str(home)],
        capture_output=True,
        timeout=WORLD_TIMEOUT_S + 400,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    status = json.loads((home / "status.json").read_text())
    assert status["state"] == "NODE_STATE_FAILED"
    assert "the DeepSpeed world of pool p could not form" in status["detail"]
    assert (
        time.monotonic() - t0 < WORLD_TIMEOUT_S + 390
    )  # bounded (world timeout + start-up on a loaded machine)
