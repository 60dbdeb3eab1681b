"""Real mosquitto brokers for tests: free port, generated conf, ACL, TLS/mTLS, CRL, kill -9.

Import the fixtures in a test module (``from tests.mqtt_fixtures import mosquitto_fixture``; the
fixture is named ``mosquitto``) or use ``Mosquitto`` directly. Every broker is stopped at teardown; a leaked process fails loudly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MOSQUITTO = "/usr/sbin/mosquitto"
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False
    crl_file: Path | None = None


@dataclass
class Mosquitto:
    """One mosquitto process on 127.0.0.1:<port>; ``kill()`` is SIGKILL, ``start()`` restarts."""

    dir: Path
    port: int = 0
    acl: str | None = None
    tls: BrokerTls | None = None
    persistence: bool = True
    # Users for the ACL file: with mTLS the certificate CN is the user name.
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def conf_file(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "mosquitto.log"

    def write_conf(self) -> None:
        lines = [
            "user root" if os.geteuid() == 0 else "",
            "per_listener_settings false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            # Save often so a kill -9 loses as little broker state as possible.
            "autosave_interval 1",
            "max_inflight_messages 20",
            "max_queued_messages 100000",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "connection_messages true",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
        ]
        if self.acl is not None:
            acl_file = self.dir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                "tls_version tlsv1.3",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
            if self.tls.require_certificate:
                lines.append("use_identity_as_username true")
            if self.tls.crl_file is not None:
                lines.append(f"crlfile {self.tls.crl_file}")
        self.conf_file.write_text("\n".join(lines) + "\n" + self.extra_conf)

    def start(self) -> None:
        """Start (or restart on the same port) and wait until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        fixed_port = bool(self.port)
        for _attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port()
            self.write_conf()
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.starts += 1
            if self._wait_accepting():
                return
            # Port taken by someone else between free_port() and bind: try another one.
            self.stop()
        raise RuntimeError(f"mosquitto did not start; log:\n{self.log_tail()}")

    def _wait_accepting(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0),
            ):
                return True
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: re-read the conf (ACL, CRL) without dropping the process."""
        assert self.proc is not None
        self.write_conf()
        self.proc.send_signal(signal.SIGHUP)

    def wait_saved(self, timeout_s: float = 10.0) -> None:
        """Block until mosquitto writes its persistence file again (state before now is saved)."""
        marker = "Saving in-memory database"
        before = self.log_file.read_text(errors="replace").count(marker)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log_file.read_text(errors="replace").count(marker) >= before + 2:
                return
            time.sleep(0.05)
        raise AssertionError("mosquitto did not autosave in time")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


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
