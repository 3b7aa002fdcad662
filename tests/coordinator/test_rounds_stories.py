"""The coordinator over real gRPC with mTLS on loopback, nodes played by the test.

The nodes here are the test itself speaking the real protocol (enroll with a
token, heartbeat, get the assignment, put a pseudo-gradient in the store,
submit a signed update) so that each attack story can craft exactly the bad
request it is about; the multi-process run with DeepSpeed nodes is in
tests/e2e. Every story ends with its reason recorded while the round goes on.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch

from coordinator.server import CoordinatorConfig, RunningCoordinator, init
from corpus.shards import shard_bytes
from protocol import panal_pb2 as pb
from protocol import tls
from protocol.client import Client, HeartbeatStream
from protocol.envelope import open_envelope, seal
from protocol.hashing import sha256
from protocol.identity import Identity
from storage import manifest, tensors
from storage.manifest import DatasetManifest, ShardEntry
from storage.stores import open_store

POOLS, STAGES = ["pool-a", "pool-b"], 2


@dataclass
class FakeNode:
    """A node as the coordinator sees it: an identity, a certificate, a client."""

    identity: Identity
    pool: str
    cert: tls.CertKey
    ca_pem: bytes
    client: Client | None = None

    def connect(self, port):
        if self.client is not None:
            self.client.close()
        self.client = Client(f"localhost:{port}", self.identity, ca_pem=self.ca_pem, cert=self.cert)
        return self

    def call(self, method, body, **kw):
        return self.client.call(self.client.node, method, body, **kw)


def start(home):
    running = RunningCoordinator(CoordinatorConfig.load(home), tick_s=0.1).start()
    return running


@pytest.fixture
def world(tmp_path):
    home = tmp_path / "coord"
    init(home, hostnames=["localhost", "127.0.0.1"], port=0, enroll_port=0, metrics_port=0, heartbeat_timeout_s=30)
    running = start(home)
    store = open_store(CoordinatorConfig.load(home).store_url)
    owner = Identity.generate()
    # One sequence of 65 tokens a shard (the nodes here do not train; detection reads the shards).
    rng = np.random.default_rng(0)
    shards = [
        str(store.put_bytes(shard_bytes(rng.integers(0, 512, (1, 65), dtype=np.uint16)), pin=True))
        for i in range(4)
    ]
    ds = DatasetManifest(
        name="t", tokenizer_cid=str(store.put_bytes(b"tok", pin=True)), vocab_size=512, seq_len=64,
        token_dtype="uint16", shards=[ShardEntry(cid=c, split="train", tokens=65, sequences=1) for c in shards],
    )
    dataset = str(store.put_bytes(manifest.sign(ds, owner), pin=True))
    ctx = {"home": home, "running": running, "store": store, "dataset": dataset}
    ctx["admin"] = Client(
        f"localhost:{running.port}", Identity.load(home / "admin.key"), ca_pem=(home / "ca.pem").read_bytes(),
        cert=tls.load(home / "admin.pem", home / "admin-tls.key"),
    )
    yield ctx
    ctx["admin"].close()
    ctx["running"].stop(grace=0)


def admin(ctx, method, body):
    return ctx["admin"].call(ctx["admin"].admin, method, body)


def enroll(ctx, pool, token=None):
    ident = Identity.generate()
    home = ctx["home"]
    token = token or admin(ctx, "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool=pool, ttl_seconds=600)).token
    csr, key = tls.make_csr(ident.fingerprint)
    with Client(f"localhost:{ctx['running'].enroll_port}", ident, ca_pem=(home / "ca.pem").read_bytes()) as c:
        reply = c.call(
            c.node, "Enroll",
            pb.EnrollRequest(token=token, pool=pool, name=f"n-{pool}", csr_pem=csr, data_address="127.0.0.1:1",
                             capabilities=pb.Capabilities(accelerator="cpu", host_memory_bytes=16 << 30)),
        )
    node = FakeNode(ident, pool, tls.CertKey(reply.certificate_pem, key), (home / "ca.pem").read_bytes())
    return node.connect(ctx["running"].port)


def job_yaml(ctx, **over):
    spec = {"name": "j1", "dataset": ctx["dataset"], "pools": POOLS, "stages": STAGES, "rounds": 2,
            "inner_steps": 1, "min_pools": 1, "round_timeout_s": 120, **over}
    return json.dumps(spec)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_job(ctx, **over):
    nodes = {p: [enroll(ctx, p) for _ in range(STAGES)] for p in POOLS}
    admin(ctx, "SubmitJob", pb.SubmitJobRequest(spec_yaml=job_yaml(ctx, **over)))
    for ns in nodes.values():
        for n in ns:
            n.call("Heartbeat", pb.HeartbeatRequest())
    wait_for(lambda: admin(ctx, "Status", pb.StatusRequest()).job_state == "running", what="job start")
    return nodes


def assignment(node):
    got = node.call("GetAssignment", pb.GetAssignmentRequest())
    assert got.has_assignment, got.reason
    return got.assignment


def make_update(ctx, node, a, *, scale=0.01, seed=0, tamper=None):
    """A real pseudo-gradient for the node's stage: same names and shapes as the start weights."""
    start = tensors.load(ctx["store"].get_bytes(a.start_weights_cid))
    g = torch.Generator().manual_seed(seed)
    delta = {k: scale * torch.randn(v.shape, generator=g) for k, v in start.items()}
    if tamper:
        tamper(delta)
    blob = tensors.dump(delta)
    cid = ctx["store"].put_bytes(blob, pin=True)
    req = pb.SubmitUpdateRequest(pool=a.pool, stage=a.stage, blob_cid=str(cid), blob_sha256=sha256(blob),
                                 blob_bytes=len(blob), base_weights_cid=a.start_weights_cid, compression="none",
                                 tokens=100, loss=3.0, norm=1.0)
    return delta, req


def submit(node, a, req):
    return node.call("SubmitUpdate", req, job=a.job, round=a.round)


def round_result(node, rnd):
    """The signed result of round ``rnd``, once the coordinator's loop has closed it (as nodes poll for it)."""
    return wait_for(
        lambda: (got := node.call("GetRoundResult", pb.GetRoundResultRequest(), job="j1", round=rnd)).ready and got,
        what=f"round {rnd} closed",
    )


def test_a_round_aggregates_with_the_outer_step_and_publishes_a_signed_result(world):
    nodes = running_job(world)
    deltas = {}
    for pool, ns in nodes.items():
        for n in ns:
            a = assignment(n)
            deltas[(pool, a.stage)], req = make_update(world, n, a, seed=hash((pool, a.stage)) % 1000)
            assert submit(n, a, req).status == pb.UPDATE_STATUS_ACCEPTED
    n0 = nodes["pool-a"][0]
    got = round_result(n0, 0)
    assert assignment(n0).round == 1, "all four updates in: the round closed and round 1 opened"
    result = open_envelope(got.result, pb.RoundResult, replay=None, job="j1", round=0).body
    assert bytes(got.result.sender) == Identity.load(world["home"] / "coordinator.key").public_key
    assert sorted(result.pools) == POOLS and all(not s.rejected for s in result.stages)
    # θ1 = θ0 − lr·(Δ̄ + μ·Δ̄) in the first round (Nesterov, zero momentum), with Δ̄ the mean.
    for stage in range(STAGES):
        start = tensors.load(world["store"].get_bytes(
            json.loads(world["running"].state.one("SELECT start_weights FROM rounds WHERE round=0")["start_weights"])[str(stage)]))
        new = tensors.load(world["store"].get_bytes(result.stages[stage].weights_cid))
        for name in start:
            mean = (deltas[("pool-a", stage)][name].double() + deltas[("pool-b", stage)][name].double()) / 2
            expect = (start[name].double() - 0.7 * (mean + 0.9 * mean)).float()
            assert torch.allclose(new[name], expect, atol=1e-6), name
    # Both pools are handed the same new weights for round 1.
    for stage in range(STAGES):
        cids = {assignment(n).start_weights_cid for ns in nodes.values() for n in ns if assignment(n).stage == stage}
        assert cids == {result.stages[stage].weights_cid}


def test_story_an_update_for_a_stage_the_node_does_not_hold(world):
    nodes = running_job(world)
    n = nodes["pool-a"][0]
    a = assignment(n)
    other = pb.Assignment()
    other.CopyFrom(a)
    other.stage = 1 - a.stage
    other.start_weights_cid = assignment(nodes["pool-a"][1]).start_weights_cid
    _, req = make_update(world, n, other)
    reply = submit(n, a, req)
    assert reply.status == pb.UPDATE_STATUS_REJECTED and "does not hold stage" in reply.reason
    _, good = make_update(world, n, a)
    assert submit(n, a, good).status == pb.UPDATE_STATUS_ACCEPTED  # training goes on


def test_story_a_replayed_update(world):
    nodes = running_job(world)
    n = nodes["pool-b"][1]
    a = assignment(n)
    _, req = make_update(world, n, a)
    env = seal(n.identity, req, job=a.job, round=a.round)
    assert n.client.node.SubmitUpdate(env, timeout=10).status == pb.UPDATE_STATUS_ACCEPTED
    with pytest.raises(grpc.RpcError) as info:
        n.client.node.SubmitUpdate(env, timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "ReplayError" in info.value.details()


@contextmanager
def held_at_its_blob_check(monkeypatch, node, a, req):
    """``submit(node, a, req)`` in a thread, held at its blob check (past the slot checks, before
    the commit) until the block ends; yields a dict that then holds its reply under "reply"."""
    import coordinator.core

    checking, go_on = threading.Event(), threading.Event()
    real = coordinator.core.load_update

    def held(store, request, **kw):
        if request.blob_cid == req.blob_cid:
            checking.set()
            assert go_on.wait(30), "the test never let the update go on"
        return real(store, request, **kw)

    monkeypatch.setattr(coordinator.core, "load_update", held)
    with submitted_and_held(node, a, req, checking, go_on, "blob check") as out:
        yield out


@contextmanager
def held_at_its_commit(monkeypatch, coordinator, node, a, req):
    """``submit(node, a, req)`` in a thread, held as its commit starts (every check passed, counted
    in flight, its transaction not begun) until the block ends; yields as held_at_its_blob_check."""
    committing, go_on = threading.Event(), threading.Event()
    real = coordinator.state.commit_tx

    @contextmanager
    def held():
        committing.set()
        assert go_on.wait(30), "the test never let the commit go on"
        with real() as db:
            yield db

    monkeypatch.setattr(coordinator.state, "commit_tx", held)
    with submitted_and_held(node, a, req, committing, go_on, "commit") as out:
        yield out


@contextmanager
def submitted_and_held(node, a, req, reached, go_on, where):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("reply", submit(node, a, req)))
    t.start()
    try:
        assert reached.wait(20), f"the update never reached its {where}"
        yield out
    finally:
        go_on.set()
        t.join(30)


def test_story_two_updates_for_one_slot_checked_at_once(world, monkeypatch):
    """A node sends two different updates for its stage at the same moment: both pass the first
    checks before either is committed, and only one may count. The first to commit is accepted;
    the other is rejected with its reason when it reaches the database."""
    nodes = running_job(world)
    n = nodes["pool-a"][0]
    a = assignment(n)
    _, first = make_update(world, n, a, seed=1)
    _, second = make_update(world, n, a, seed=2)
    with held_at_its_blob_check(monkeypatch, n, a, first) as held:
        assert submit(n, a, second).status == pb.UPDATE_STATUS_ACCEPTED
    assert held["reply"].status == pb.UPDATE_STATUS_REJECTED
    assert "already has an accepted update" in held["reply"].reason
    rows = world["running"].coordinator.state.query(
        "SELECT blob_cid, status FROM updates WHERE job=? AND round=? AND pool=? AND stage=?",
        (a.job, a.round, a.pool, a.stage),
    )
    assert sorted((r["blob_cid"], r["status"]) for r in rows) == sorted(
        [(second.blob_cid, "accepted"), (first.blob_cid, "rejected")]
    )


def test_story_an_update_still_being_checked_when_its_round_closes(world, monkeypatch):
    """The round's deadline passes while an update is being checked: the round closes without
    it, so it is rejected, not acknowledged as if it counted."""
    nodes = running_job(world, round_timeout_s=2)
    late = nodes["pool-a"][0]
    a = assignment(late)
    _, req = make_update(world, late, a)
    with held_at_its_blob_check(monkeypatch, late, a, req) as held:
        for n in nodes["pool-b"]:  # pool-b answers; the round closes at its deadline without pool-a
            b = assignment(n)
            assert submit(n, b, make_update(world, n, b)[1]).status == pb.UPDATE_STATUS_ACCEPTED
        round_result(nodes["pool-b"][0], a.round)
    assert held["reply"].status == pb.UPDATE_STATUS_REJECTED
    assert f"round {a.round} closed while the update was being checked" in held["reply"].reason


def test_story_an_update_being_committed_when_its_round_closes_is_in_the_close(world, monkeypatch):
    """The round's deadline passes while an update that passed every check is being committed
    (outside the coordinator's lock, so that its disk wait holds up no other call): the close
    waits for that commit, and the update, answered accepted, is aggregated in that round."""
    nodes = running_job(world, round_timeout_s=3)
    coordinator = world["running"].coordinator
    for n in nodes["pool-b"]:  # pool-b answers; pool-a's first stage does not
        b = assignment(n)
        assert submit(n, b, make_update(world, n, b)[1]).status == pb.UPDATE_STATUS_ACCEPTED
    late = nodes["pool-a"][0]
    a = assignment(late)
    _, req = make_update(world, late, a)
    with held_at_its_commit(monkeypatch, coordinator, late, a, req) as out:
        # The deadline passes; the loop's close waits for the commit in flight.
        wait_for(lambda: coordinator._closing[(a.job, a.round)], what="the close waiting for the commit")
        got = late.call("GetRoundResult", pb.GetRoundResultRequest(), job=a.job, round=a.round)
        assert not got.ready
    assert out["reply"].status == pb.UPDATE_STATUS_ACCEPTED, out["reply"].reason
    result = open_envelope(round_result(late, a.round).result, pb.RoundResult, replay=None).body
    stage = next(s for s in result.stages if s.stage == a.stage)
    assert out["reply"].update_id in stage.accepted_update_ids
    assert "pool-a" in result.pools


def test_story_a_blob_whose_hash_does_not_match_its_manifest(world):
    nodes = running_job(world)
    n = nodes["pool-a"][1]
    a = assignment(n)
    _, req = make_update(world, n, a)
    req.blob_sha256 = sha256(b"something else")
    reply = submit(n, a, req)
    assert reply.status == pb.UPDATE_STATUS_REJECTED and "SHA-256 does not match" in reply.reason
    rounds = admin(world, "ListRounds", pb.ListRoundsRequest())
    assert rounds.rounds[0].updates_rejected == 1


@pytest.mark.parametrize(
    ("story", "tamper", "reason"),
    [
        ("a NaN in the pseudo-gradient", lambda d: next(iter(d.values())).view(-1).__setitem__(0, float("nan")), "NaN"),
        ("a tensor of the wrong shape", lambda d: d.update({k: torch.zeros(3) for k in list(d)[:1]}), "shape"),
        ("an extra tensor", lambda d: d.update({"evil": torch.zeros(1)}), "unexpected"),
    ],
)
def test_story_malformed_pseudo_gradients(world, story, tamper, reason):
    nodes = running_job(world)
    n = nodes["pool-b"][0]
    a = assignment(n)
    _, req = make_update(world, n, a, tamper=tamper)
    reply = submit(n, a, req)
    assert reply.status == pb.UPDATE_STATUS_REJECTED and reason in reply.reason, (story, reply.reason)


def test_a_slot_answered_by_a_rejected_update_does_not_hold_the_round_open(world):
    """The node holding a slot sends an update that is rejected: its slot has answered. Once
    every other slot has too, the round closes at once (not at its 120 s deadline), without it."""
    nodes = running_job(world)
    bad = nodes["pool-b"][0]
    a = assignment(bad)
    nan = lambda d: next(iter(d.values())).view(-1).__setitem__(0, float("nan"))  # noqa: E731
    rejected = submit(bad, a, make_update(world, bad, a, tamper=nan)[1])
    assert rejected.status == pb.UPDATE_STATUS_REJECTED
    for n in [*nodes["pool-a"], *nodes["pool-b"][1:]]:
        b = assignment(n)
        assert submit(n, b, make_update(world, n, b)[1]).status == pb.UPDATE_STATUS_ACCEPTED
    result = open_envelope(round_result(bad, a.round).result, pb.RoundResult, replay=None).body
    stage = next(s for s in result.stages if s.stage == a.stage)
    assert [r.update_id for r in stage.rejected] == [rejected.update_id]
    assert len(stage.accepted_update_ids) == 1  # pool-a's


def test_heartbeats_on_a_stream_reach_the_coordinator_and_stop_at_eviction(world):
    node = enroll(world, "pool-a")
    stream = HeartbeatStream(node.client)
    for step in (5, 6):
        assert stream.beat(pb.HeartbeatRequest(state=pb.NODE_STATE_TRAINING, step=step)).server_time_ms > 0
    state = world["running"].coordinator.state
    assert state.node(node.identity.fingerprint).status["step"] == 6
    admin(world, "EvictNode", pb.EvictNodeRequest(node_id=node.identity.fingerprint, reason="test"))
    with pytest.raises(grpc.RpcError) as info:
        stream.beat(pb.HeartbeatRequest(step=7))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "evicted" in info.value.details()
    stream.close()
    assert state.node(node.identity.fingerprint).status["step"] == 6


def test_story_an_update_from_an_evicted_node(world):
    nodes = running_job(world)
    n = nodes["pool-a"][0]
    a = assignment(n)
    admin(world, "EvictNode", pb.EvictNodeRequest(node_id=n.identity.fingerprint, reason="misbehaving"))
    _, req = make_update(world, n, a)
    with pytest.raises(grpc.RpcError) as info:
        submit(n, a, req)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "evicted" in info.value.details()
    status = admin(world, "Status", pb.StatusRequest())
    assert any("evicted" in p.detail for p in status.pools)


def test_story_enrollment_with_a_used_or_expired_token(world):
    token = admin(world, "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool="pool-a", ttl_seconds=600)).token
    enroll(world, "pool-a", token)
    with pytest.raises(grpc.RpcError) as info:
        enroll(world, "pool-a", token)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "already used" in info.value.details()
    short = admin(world, "CreateEnrollmentToken", pb.CreateEnrollmentTokenRequest(pool="pool-a", ttl_seconds=1))
    wait_for(lambda: time.time() * 1000 > short.expires_at_ms + 10, what="token expiry")
    with pytest.raises(grpc.RpcError) as info:
        enroll(world, "pool-a", short.token)
    assert "expired" in info.value.details()


def test_story_the_coordinator_restarts_mid_round_and_loses_nothing(world):
    nodes = running_job(world)
    n = nodes["pool-a"][0]
    a = assignment(n)
    _, req = make_update(world, n, a)
    accepted = submit(n, a, req)
    assert accepted.status == pb.UPDATE_STATUS_ACCEPTED
    world["running"].stop(grace=0)
    world["running"] = start(world["home"])  # same files, a fresh process state
    # Test coordinators listen on port 0: the restarted one has new ports, so everyone reconnects.
    for ns in nodes.values():
        for node in ns:
            node.connect(world["running"].port)
    world["admin"].close()
    world["admin"] = Client(
        f"localhost:{world['running'].port}", Identity.load(world["home"] / "admin.key"),
        ca_pem=(world["home"] / "ca.pem").read_bytes(),
        cert=tls.load(world["home"] / "admin.pem", world["home"] / "admin-tls.key"),
    )
    rounds = admin(world, "ListRounds", pb.ListRoundsRequest())
    assert rounds.rounds[0].state == "open" and rounds.rounds[0].updates_accepted == 1
    # The acknowledged update is still there: resubmitting it is recognised, not duplicated.
    assert submit(nodes["pool-a"][0], a, req).reason == "already accepted"
    for pool, ns in nodes.items():
        for node in ns:
            b = assignment(node)
            if (pool, b.stage) == ("pool-a", a.stage):
                continue
            _, r = make_update(world, node, b)
            assert submit(node, b, r).status == pb.UPDATE_STATUS_ACCEPTED
    round_result(nodes["pool-b"][0], 0)
    assert admin(world, "ListRounds", pb.ListRoundsRequest()).rounds[0].round == 1


def test_story_a_pool_whose_world_cannot_form_is_reported_and_the_round_goes_on(world):
    """pool-a's node reports that its DeepSpeed world failed: the pool is marked failed with the
    reason, the round closes on pool-b's updates, and pool-a re-forms for the next round."""
    nodes = running_job(world)
    a_node = nodes["pool-a"][0]
    epoch = assignment(a_node).epoch
    a_node.call("Heartbeat", pb.HeartbeatRequest(
        state=pb.NODE_STATE_FAILED, epoch=epoch, detail="the DeepSpeed world of pool pool-a could not form: timeout"))
    status = admin(world, "Status", pb.StatusRequest())
    pool_a = next(p for p in status.pools if p.pool == "pool-a")
    assert pool_a.state == "failed" and "could not form" in pool_a.detail
    for n in nodes["pool-b"]:
        a = assignment(n)
        _, req = make_update(world, n, a)
        assert submit(n, a, req).status == pb.UPDATE_STATUS_ACCEPTED
    got = round_result(nodes["pool-b"][0], 0)
    assert list(open_envelope(got.result, pb.RoundResult, replay=None).body.pools) == ["pool-b"]
    again = assignment(a_node)
    assert again.round == 1 and again.epoch == epoch + 1  # a fresh world for the next round


def test_story_a_poisoning_pool_is_rejected_then_quarantined_then_readmitted(world):
    """Pool c flips the sign of its pseudo-gradient every round. Detection rejects it with the
    reason, the round closes on the honest pools, and after two rejections the node is
    quarantined (its calls refused) until the admin re-admits it."""
    pools = ["pool-a", "pool-b", "pool-c"]
    nodes = {p: enroll(world, p) for p in pools}
    admin(world, "SubmitJob", pb.SubmitJobRequest(spec_yaml=job_yaml(world, pools=pools, stages=1, rounds=4)))
    for n in nodes.values():
        n.call("Heartbeat", pb.HeartbeatRequest())
    wait_for(lambda: admin(world, "Status", pb.StatusRequest()).job_state == "running", what="job start")
    direction = None
    for rnd in range(2):
        for i, (pool, n) in enumerate(sorted(nodes.items())):
            a = assignment(n)
            assert a.round == rnd

            def honest_or_flipped(delta, pool=pool, i=i):
                nonlocal direction
                g = torch.Generator().manual_seed(100 * rnd + i)
                if direction is None:
                    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in delta.items()}
                for k in delta:
                    delta[k] = 0.01 * (direction[k] + 0.3 * torch.randn(delta[k].shape, generator=g))
                    if pool == "pool-c":
                        delta[k] = -delta[k]

            _, req = make_update(world, n, a, tamper=honest_or_flipped)
            assert submit(n, a, req).status == pb.UPDATE_STATUS_ACCEPTED  # passes every check at submission
        got = round_result(nodes["pool-a"], rnd)
        result = open_envelope(got.result, pb.RoundResult, replay=None).body
        assert result.pools == ["pool-a", "pool-b"]
        (rejected,) = result.stages[0].rejected
        assert rejected.pool == "pool-c" and "rejected by detection" in rejected.reason and "cosine" in rejected.reason
        # Every update's scores are in the result, the audit log and the metrics.
        scores = {s.pool: s for s in result.stages[0].scores}
        assert sorted(scores) == pools and [s.accepted for _, s in sorted(scores.items())] == [True, True, False]
        assert scores["pool-c"].cosine < 0 < scores["pool-a"].cosine and scores["pool-a"].row_ratio == 0  # row check off
        # The absent-token check ran: the result names each pool's shards, and every update has its score.
        assert [p.pool for p in result.pool_shards] == pools and all(p.shard_cids for p in result.pool_shards)
        assert all(s.absent_row and s.absent_row_ratio > 0 for s in scores.values())
        events = world["running"].state.query("SELECT detail FROM audit WHERE kind='update_scored' AND round=?", (rnd,))
        assert sorted(json.loads(e["detail"])["pool"] for e in events) == pools
        sample = world["running"].coordinator.metrics.registry.get_sample_value(
            "panal_update_score", {"pool": "pool-c", "stage": "0", "score": "cosine"}
        )
        assert sample == scores["pool-c"].cosine
    c = nodes["pool-c"]
    with pytest.raises(grpc.RpcError) as info:
        c.call("Heartbeat", pb.HeartbeatRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "quarantined" in info.value.details()
    listed = {n.node_id: n.state for n in admin(world, "ListNodes", pb.ListNodesRequest()).nodes}
    assert listed[c.identity.fingerprint] == "quarantined"
    admin(world, "ReadmitNode", pb.ReadmitNodeRequest(node_id=c.identity.fingerprint[:10], reason="fixed"))
    assert c.call("Heartbeat", pb.HeartbeatRequest()).server_time_ms > 0


def test_anyone_can_recompute_a_round_from_the_store(world):
    """`panal admin verify-round`: the signed result, the start weights, the signed inputs and
    the bit-identical recomputation all check out — and a result the coordinator did not sign,
    or one whose weights were swapped, does not."""
    from coordinator.job import JobSpec
    from coordinator.verify_round import verify_round

    nodes = running_job(world)
    for rnd in range(2):
        for ns in nodes.values():
            for n in ns:
                a = assignment(n)
                _, req = make_update(world, n, a, seed=rnd * 10 + a.stage)
                submit(n, a, req)
        round_result(nodes["pool-a"][0], rnd)
    rows = {r.round: r.result_cid for r in admin(world, "ListRounds", pb.ListRoundsRequest()).rounds}
    spec = JobSpec.model_validate_json(admin(world, "GetJob", pb.GetJobRequest()).spec_yaml)
    key = Identity.load(world["home"] / "coordinator.key").public_key
    for rnd in range(2):
        checks = verify_round(world["store"], spec, rows[rnd], round=rnd, coordinator_key=key,
                              previous_cid=rows.get(rnd - 1))
        assert all(c.ok for c in checks), checks
        assert len(checks) == 1 + 3 * STAGES
    # A result signed by someone else is refused.
    forged = Identity.generate()
    body = open_envelope(pb.Envelope.FromString(world["store"].get_bytes(rows[1])), pb.RoundResult, replay=None).body
    forged_cid = str(world["store"].put_bytes(seal(forged, body, job="j1", round=1).SerializeToString()))
    assert not verify_round(world["store"], spec, forged_cid, round=1, coordinator_key=key)[0].ok
    # A result (properly signed) whose stage weights were swapped fails the recomputation.
    coordinator = Identity.load(world["home"] / "coordinator.key")
    body.stages[0].weights_cid = body.stages[1].weights_cid
    swapped = str(world["store"].put_bytes(seal(coordinator, body, job="j1", round=1).SerializeToString()))
    bad = [c for c in verify_round(world["store"], spec, swapped, round=1, coordinator_key=key, previous_cid=rows[0]) if not c.ok]
    assert [c.what for c in bad] == ["stage 0 outcome"]
    # The inputs are one blob a round, each envelope found by its CID: a bundle short of one fails its stage.
    body = open_envelope(pb.Envelope.FromString(world["store"].get_bytes(rows[1])), pb.RoundResult, replay=None).body
    bundle = pb.EnvelopeBundle.FromString(world["store"].get_bytes(body.input_envelopes_cid))
    assert len(bundle.envelopes) == sum(len(s.input_envelope_cids) for s in body.stages) == 2 * STAGES
    del bundle.envelopes[0]  # stage 0's first input
    body.input_envelopes_cid = str(world["store"].put_bytes(bundle.SerializeToString()))
    short = str(world["store"].put_bytes(seal(coordinator, body, job="j1", round=1).SerializeToString()))
    bad = [c for c in verify_round(world["store"], spec, short, round=1, coordinator_key=key, previous_cid=rows[0]) if not c.ok]
    assert [c.what for c in bad] == ["stage 0 inputs"] and "is not in the round's bundle" in bad[0].detail


def test_the_weights_specs_remembered_are_bounded(world, monkeypatch):
    """A spec per stage per round is read once and remembered; past MAX_SPECS the oldest go."""
    import coordinator.rounds

    nodes = running_job(world)
    a = assignment(nodes["pool-a"][0])
    closer = world["running"].coordinator.closer
    monkeypatch.setattr(coordinator.rounds, "MAX_SPECS", 1)
    first = closer.weights_spec(a.job, a.round, 0)
    second = closer.weights_spec(a.job, a.round, 1)
    assert list(closer._specs.values()) == [second] and first != second
    assert closer.weights_spec(a.job, a.round, 0) == first  # read again from its blob
