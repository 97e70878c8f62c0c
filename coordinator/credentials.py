"""TLS for the coordinator: the lab's certificate authority and the SuperLink's certificate.

    <dir>/ca.crt, ca.key           the lab's certificate authority (robots get ca.crt only)
    <dir>/server.pem, server.key   the SuperLink's certificate, valid for the given hosts/IPs

Robots make their own authentication keys (`fedbot-agent keygen`, agent/supernode.py); only their
public keys come to the lab server, to be registered. The CA key never leaves this directory.

Generated with `cryptography` (already a Flower dependency) rather than an openssl script, so a
fresh machine needs no extra tools. Existing files are kept (a new server certificate is signed by
the existing CA); every file is written atomically and private keys are readable by their owner only.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedbot.atomic_files import write_bytes_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
VALID_DAYS = 825


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: str, public_key, issuer: x509.Name | None, signer, *, ca: bool, hosts=()):
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def ensure_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `out`, created if missing."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_CERT).exists() and (out / CA_KEY).exists():
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
        return x509.load_pem_x509_certificate((out / CA_CERT).read_bytes()), key
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate("fedbot federation CA", key.public_key(), None, key, ca=True)
    write_bytes_atomic(out / CA_KEY, _pem_key(key), private=True)
    write_bytes_atomic(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_server_certificate(out: Path, hosts: list[str]) -> Path:
    """A SuperLink certificate for `hosts` (names or IPs robots dial) and 127.0.0.1 (where the
    SuperLink itself listens behind the fleet gateway), signed by the CA."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address")
    hosts = [*hosts, *(local for local in ("127.0.0.1", "localhost") if local not in hosts)]
    ca_cert, ca_key = ensure_ca(out)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(hosts[0], key.public_key(), ca_cert.subject, ca_key, ca=False, hosts=hosts)
    write_bytes_atomic(out / SERVER_KEY, _pem_key(key), private=True)
    write_bytes_atomic(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return out / SERVER_CERT
