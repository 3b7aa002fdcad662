"""Signed envelopes: round trips (property tests), tampering, replay, context."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import panal_pb2 as pb
from protocol.envelope import canonical_bytes, open_envelope, seal, signed_bytes
from protocol.errors import (
    ClockSkewError,
    IntegrityError,
    MalformedMessage,
    ProtocolError,
    ReplayError,
    SignatureError,
    WrongContextError,
)
from protocol.identity import Identity
from protocol.replay import ReplayGuard

ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))

names = st.text(max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    job=names,
    round=st.integers(0, 2**64 - 1),
    detail=st.text(max_size=200),
    step=st.integers(0, 2**64 - 1),
    loss=st.floats(allow_nan=False),
)
def test_sign_then_verify_round_trips(job, round, detail, step, loss):
    body = pb.HeartbeatRequest(step=step, loss=loss, detail=detail)
    env = seal(ALICE, body, job=job, round=round)
    got = open_envelope(env, pb.HeartbeatRequest, replay=ReplayGuard(), job=job, round=round)
    assert got.body == body and got.sender == ALICE.public_key and got.round == round


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_in_the_wire_bytes_is_caught(data):
    """Flip any one bit of a serialized envelope: it never verifies as the same message."""
    env = seal(ALICE, pb.HeartbeatRequest(step=7, detail="ok"), job="j", round=1)
    raw = bytearray(env.SerializeToString())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        tampered = pb.Envelope.FromString(bytes(raw))
        got = open_envelope(tampered, pb.HeartbeatRequest, replay=None, job="j", round=1)
    except Exception as e:  # DecodeError at the wire, or a specific ProtocolError
        assert isinstance(e, ProtocolError) or type(e).__name__ == "DecodeError"
    else:
        # A flip inside an unknown-field region could still decode; it must not change meaning.
        pytest.fail(f"tampered envelope verified: {got}")


@settings(max_examples=40, deadline=None)
@given(a=st.tuples(names, names), b=st.tuples(names, names))
def test_canonical_bytes_are_unambiguous(a, b):
    """Length prefixes keep ("ab", "c") and ("a", "bc") apart."""
    common = dict(round=1, sender=bytes(32), timestamp_ms=5, nonce=bytes(16), payload_sha256=bytes(32))
    ca = canonical_bytes(kind=a[0], job=a[1], **common)
    cb = canonical_bytes(kind=b[0], job=b[1], **common)
    assert (ca == cb) == (a == b)


def test_flipped_payload_bit_is_an_integrity_error():
    env = seal(ALICE, pb.HeartbeatRequest(step=1), job="j")
    payload = bytearray(env.payload)
    payload[0] ^= 0x01
    env.payload = bytes(payload)
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        open_envelope(env, pb.HeartbeatRequest, replay=None)


def test_recomputed_digest_still_fails_the_signature():
    """An attacker changes the payload and fixes the digest: the signature no longer covers it."""
    from protocol.hashing import sha256

    env = seal(ALICE, pb.HeartbeatRequest(step=1))
    env.payload = pb.HeartbeatRequest(step=999).SerializeToString()
    env.payload_sha256 = sha256(env.payload)
    with pytest.raises(SignatureError):
        open_envelope(env, pb.HeartbeatRequest, replay=None)


def test_signature_by_another_key_is_refused():
    env = seal(ALICE, pb.HeartbeatRequest(step=1))
    env.signature = MALLORY.sign(signed_bytes(env))
    with pytest.raises(SignatureError, match=ALICE.fingerprint):
        open_envelope(env, pb.HeartbeatRequest, replay=None)


def test_wrong_kind_job_and_round():
    env = seal(ALICE, pb.HeartbeatRequest(step=1), job="job-1", round=3)
    with pytest.raises(WrongContextError, match="kind"):
        open_envelope(env, pb.SubmitUpdateRequest, replay=None)
    with pytest.raises(WrongContextError, match="job"):
        open_envelope(env, pb.HeartbeatRequest, replay=None, job="job-2")
    with pytest.raises(WrongContextError, match="round 3"):
        open_envelope(env, pb.HeartbeatRequest, replay=None, job="job-1", round=4)


def test_short_fields_are_malformed():
    env = seal(ALICE, pb.HeartbeatRequest(step=1))
    env.signature = env.signature[:10]
    with pytest.raises(MalformedMessage, match="signature must be 64 bytes"):
        open_envelope(env, pb.HeartbeatRequest, replay=None)


class FakeClock:
    """A clock the test moves by hand (time is an input of the replay guard)."""

    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def test_replay_guard_window_and_nonces():
    clock = FakeClock(1_000_000)
    guard = ReplayGuard(window_ms=10_000, max_entries=100, clock=clock)
    env = seal(ALICE, pb.HeartbeatRequest(step=1), timestamp_ms=clock.t)
    open_envelope(env, pb.HeartbeatRequest, replay=guard)
    with pytest.raises(ReplayError, match="already received"):
        open_envelope(env, pb.HeartbeatRequest, replay=guard)
    old = seal(ALICE, pb.HeartbeatRequest(step=1), timestamp_ms=clock.t - 10_001)
    with pytest.raises(ClockSkewError, match="behind"):
        open_envelope(old, pb.HeartbeatRequest, replay=guard)
    future = seal(ALICE, pb.HeartbeatRequest(step=1), timestamp_ms=clock.t + 60_000)
    with pytest.raises(ClockSkewError, match="ahead"):
        open_envelope(future, pb.HeartbeatRequest, replay=guard)
    # After the window passes, the entry is dropped, and the old envelope is refused by time.
    clock.t += 20_000
    open_envelope(seal(ALICE, pb.HeartbeatRequest(), timestamp_ms=clock.t), pb.HeartbeatRequest, replay=guard)
    assert len(guard) == 1
    with pytest.raises(ClockSkewError):
        open_envelope(env, pb.HeartbeatRequest, replay=guard)


def test_replay_guard_stays_bounded_without_opening_a_replay_door():
    clock = FakeClock(10_000_000)
    guard = ReplayGuard(window_ms=60_000, max_entries=50, clock=clock)
    sent = [seal(ALICE, pb.HeartbeatRequest(step=i), timestamp_ms=clock.t - 1000 + i) for i in range(200)]
    for env in sent:
        open_envelope(env, pb.HeartbeatRequest, replay=guard)
    assert len(guard) == 50
    for env in sent:  # every one of them, remembered or forgotten, is refused
        with pytest.raises(ReplayError):
            open_envelope(env, pb.HeartbeatRequest, replay=guard)


def test_nonce_is_remembered_only_after_every_check_passes():
    guard = ReplayGuard()
    env = seal(ALICE, pb.HeartbeatRequest(step=1), job="a")
    with pytest.raises(WrongContextError):
        open_envelope(env, pb.HeartbeatRequest, replay=guard, job="b")
    assert len(guard) == 0
    open_envelope(env, pb.HeartbeatRequest, replay=guard, job="a")
