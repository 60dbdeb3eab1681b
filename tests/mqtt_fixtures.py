"""Real mosquitto brokers for tests: free port, generated conf, ACL, TLS/mTLS, CRL, kill -9.

Its fixtures (``mosquitto``, ``pki``) reach every test module through ``pytest_plugins`` in
tests/conftest.py; or use ``Mosquitto`` directly. Every broker is stopped at teardown; a leaked
process fails loudly.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulators.broker import MOSQUITTO, BrokerTls, Mosquitto, free_port

__all__ = ["MOSQUITTO", "BrokerTls", "Mosquitto", "Pki", "dynsec_broker", "free_port"]

# ---------------------------------------------------------------- certificates


@dataclass
class Pki:
    """A private CA with a broker certificate, client certificates and a CRL, all in ``dir``."""

    dir: Path
    name: str = "test-ca"
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    ca_cert: x509.Certificate = field(init=False)
    revoked: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = dt.datetime.now(dt.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.write_crl()

    @property
    def ca_file(self) -> Path:
        return self.dir / f"{self.name}.pem"

    @property
    def crl_file(self) -> Path:
        return self.dir / f"{self.name}.crl.pem"

    def issue(self, cn: str, *, server: bool) -> tuple[Path, Path, x509.Certificate]:
        """Write ``<cn>.crt``/``<cn>.key`` signed by this CA; return (cert path, key path, cert)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path = self.dir / f"{cn}.crt"
        key_path = self.dir / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path, cert

    def revoke(self, cert: x509.Certificate) -> None:
        self.revoked.append(cert.serial_number)
        self.write_crl()

    def write_crl(self) -> None:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=1))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(self.ca_key, hashes.SHA256())
        self.crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def spki_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's DER SubjectPublicKeyInfo (the pin format of TlsConfig)."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


# ---------------------------------------------------------------- broker


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain-TCP loopback broker with persistence."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def dynsec_broker(dir: Path, *, deny_subscribe: list[str]) -> Mosquitto:
    """Real mosquitto whose dynamic-security plugin refuses subscriptions to ``deny_subscribe``
    (patterns): mosquitto's plain acl_file grants any SUBSCRIBE and filters at delivery, so only
    a plugin makes it answer a SUBACK with a refusal as production brokers do."""
    plugin = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    assert plugin, "mosquitto's dynamic security plugin is missing (Debian package mosquitto)"
    dir.mkdir(parents=True, exist_ok=True)
    acls = [{"acltype": "subscribePattern", "topic": t, "allow": False} for t in deny_subscribe]
    (dir / "dynsec.json").write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": True,
                    "publishClientReceive": True,
                    "subscribe": True,
                    "unsubscribe": True,
                },
                "clients": [],
                "groups": [{"groupname": "anonymous", "roles": [{"rolename": "cabinets"}]}],
                "roles": [{"rolename": "cabinets", "acls": acls}],
                "anonymousGroup": "anonymous",
            }
        )
    )
    return Mosquitto(
        dir,
        extra_conf=f"plugin {plugin[0]}\nplugin_opt_config_file {dir / 'dynsec.json'}\n",
    )
