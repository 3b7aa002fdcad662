"""TLS material with ``cryptography``: the coordinator CA, server and node certificates,
and gRPC mTLS credentials built from them.

Keys are ECDSA P-256 (what every TLS stack gRPC links accepts). A node's
certificate carries its node id (the fingerprint of its Ed25519 key) as the
common name, so the server can bind a TLS session to the envelopes' signer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import IdentityError, MalformedMessage, MessageTooLarge, SignatureError

MAX_PEM_BYTES = 16 * 1024
CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key. Never log ``key_pem``."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"CertKey(subject={subject_common_name(self.cert_pem)!r})"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError("panal TLS keys are ECDSA P-256")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "panal"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "panal coordinator CA", days: int = CA_DAYS) -> CertKey:
    key = _new_key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(
    ca: CertKey,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    days: int,
) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = _load_key(ca.key_pem)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_server_cert(ca: CertKey, hostnames: list[str], days: int = LEAF_DAYS) -> CertKey:
    """A server certificate for the coordinator, valid for each hostname or IP address."""
    if not hostnames:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = _new_key()
    cert = _issue(
        ca,
        key.public_key(),
        hostnames[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
        days=days,
    )
    return CertKey(cert, _key_pem(key))


def make_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new TLS key and a certificate signing request for it: (csr_pem, key_pem)."""
    key = _new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def sign_csr(ca: CertKey, csr_pem: bytes, node_id: str, days: int = LEAF_DAYS) -> bytes:
    """Issue a client certificate for ``node_id`` from a node's CSR.

    The common name is always ``node_id`` (what the coordinator verified from
    the node's signature), whatever the CSR asked for.
    """
    if len(csr_pem) > MAX_PEM_BYTES:
        raise MessageTooLarge(f"CSR is {len(csr_pem)} bytes; the limit is {MAX_PEM_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise MalformedMessage(f"CSR is not a PEM certificate signing request: {e}") from e
    if not csr.is_signature_valid:
        raise SignatureError("CSR signature does not verify: it was not made with its own key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise MalformedMessage("CSR key must be ECDSA P-256")
    return _issue(ca, public_key, node_id, usage=ExtendedKeyUsageOID.CLIENT_AUTH, sans=[], days=days)


def make_client_cert(ca: CertKey, node_id: str, days: int = LEAF_DAYS) -> CertKey:
    csr, key = make_csr(node_id)
    return CertKey(sign_csr(ca, csr, node_id, days), key)


def subject_common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def verify_issued_by(cert_pem: bytes, ca_cert_pem: bytes) -> None:
    """Raise SignatureError unless ``cert_pem`` was signed by the CA."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise SignatureError(f"certificate {subject_common_name(cert_pem)!r} is not from this CA") from e


# ---------------------------------------------------------------- gRPC helpers


def server_credentials(
    ca_cert_pem: bytes, server: CertKey, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """mTLS server credentials (client certificates required and verified against the CA)."""
    return grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)],
        root_certificates=ca_cert_pem,
        require_client_auth=require_client_auth,
    )


def channel_credentials(ca_cert_pem: bytes, client: CertKey | None = None) -> grpc.ChannelCredentials:
    """Channel credentials trusting only the coordinator CA; with ``client``, mTLS."""
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )


# ---------------------------------------------------------------- files


def write_private(path: str | Path, data: bytes) -> None:
    """Write secret material with mode 0600 from the first byte (no window of exposure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def save(pair: CertKey, cert_path: str | Path, key_path: str | Path) -> None:
    Path(cert_path).parent.mkdir(parents=True, exist_ok=True)
    Path(cert_path).write_bytes(pair.cert_pem)
    write_private(key_path, pair.key_pem)


def load(cert_path: str | Path, key_path: str | Path) -> CertKey:
    key_path = Path(key_path)
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(
            f"TLS key {key_path} has mode {mode:04o}, open to group or others; run `chmod 600 {key_path}`"
        )
    return CertKey(Path(cert_path).read_bytes(), key_path.read_bytes())
