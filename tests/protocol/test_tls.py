"""TLS material: CSRs signed with the node id, certificates checked against the CA."""

import stat

import pytest

from protocol import tls
from protocol.errors import IdentityError, MalformedMessage, MessageTooLarge, SignatureError


def test_csr_is_issued_with_the_verified_node_id_whatever_it_asked_for():
    ca = tls.make_ca()
    csr, _key = tls.make_csr("i-am-the-coordinator")
    cert = tls.sign_csr(ca, csr, "abcd" * 8)
    assert tls.subject_common_name(cert) == "abcd" * 8
    tls.verify_issued_by(cert, ca.cert_pem)


def test_certificate_from_another_ca_is_refused():
    cert = tls.make_client_cert(tls.make_ca("other"), "n1")
    with pytest.raises(SignatureError, match="not from this CA"):
        tls.verify_issued_by(cert.cert_pem, tls.make_ca().cert_pem)


def test_bad_and_oversized_csr():
    ca = tls.make_ca()
    with pytest.raises(MalformedMessage):
        tls.sign_csr(
            ca, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "n"
        )
    with pytest.raises(MessageTooLarge):
        tls.sign_csr(ca, b"x" * (tls.MAX_PEM_BYTES + 1), "n")


def test_tls_keys_are_written_0600_and_loose_ones_refused(tmp_path):
    ca = tls.make_ca()
    tls.save(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert tls.load(tmp_path / "ca.pem", tmp_path / "ca.key") == ca
    assert "BEGIN" not in repr(ca)
    (tmp_path / "ca.key").chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        tls.load(tmp_path / "ca.pem", tmp_path / "ca.key")
