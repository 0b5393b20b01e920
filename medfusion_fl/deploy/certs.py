"""Key material for a real federation, made with `cryptography`:

- a certificate authority (ca.pem + ca.key) that signs the SuperLink's TLS certificate;
- the SuperLink's certificate (superlink.pem + superlink.key) with the coordinator's host names
  and IP addresses as subject alternative names (what `flower-superlink --ssl-*` takes);
- one authentication key pair per hospital (sites/<name>/auth_key[.pub]): OpenSSH ECDSA P-384, the
  form `flower-supernode --auth-supernode-private-key` and `flwr supernode register` take.
Private keys are written with mode 0600, atomically. Existing keys and the CA are never
overwritten: they are reused (the CA signs again) or kept, and the report says which.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfusion_fl.durable import write_bytes_atomic
from medfusion_fl.errors import ConfigError

log = logging.getLogger(__name__)
CA_DAYS, CERT_DAYS = 3650, 825


@dataclass
class CertReport:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    write_bytes_atomic(path, data, mode=0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key; move it away to create a new one")
    return key


def _ca(out: Path, report: CertReport) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path, cert_path = out / "ca.key", out / "ca.pem"
    if key_path.exists() != cert_path.exists():
        raise ConfigError(f"{out} has only one of ca.key and ca.pem; restore the other or remove both")
    if key_path.exists():
        report.kept += [cert_path, key_path]
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), _load_key(key_path)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedFusion-FL federation CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(key_path, key, serialization.PrivateFormat.PKCS8)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    report.created += [cert_path, key_path]
    return cert, key


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ConfigError(f"--host {host!r} is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host))
    return names


def _superlink(out: Path, hosts: list[str], ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
               report: CertReport) -> None:
    key_path, cert_path = out / "superlink.key", out / "superlink.pem"
    wanted = _sans(hosts)
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(have) != set(wanted):
            raise ConfigError(f"{cert_path} names {sorted(map(str, have))}, not {sorted(map(str, wanted))}; "
                              "remove superlink.pem and superlink.key to issue a new one, or pass the same --host")
        report.kept += [cert_path, key_path]
        return
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(key_path, key, serialization.PrivateFormat.PKCS8)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    report.created += [cert_path, key_path]


def _site_key(out: Path, site: str, report: CertReport) -> None:
    if not site or "/" in site or site.startswith("."):
        raise ConfigError(f"--site {site!r}: use a plain name such as H1 (it becomes a folder name)")
    folder = out / "sites" / site
    private, public = folder / "auth_key", folder / "auth_key.pub"
    if private.exists():
        report.kept += [private, public]
        return
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key, serialization.PrivateFormat.OpenSSH)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(public, pub + f" {site}\n".encode(), mode=0o644)
    report.created += [private, public]


def make_certs(out: Path, *, hosts: list[str], sites: list[str]) -> CertReport:
    """Create (or reuse) the CA, the SuperLink's certificate and each site's authentication key."""
    if not hosts:
        raise ConfigError("give the coordinator's host names or IPs (--host), e.g. --host coord.example.org "
                          "--host 127.0.0.1: they go into the SuperLink's certificate")
    if len(set(sites)) != len(sites):
        raise ConfigError(f"--site names must be unique, got {sites}")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    report = CertReport()
    ca = _ca(out, report)
    _superlink(out, hosts, ca, report)
    for site in sites:
        _site_key(out, site, report)
    for path in report.created:
        log.info("created %s", path)
    for path in report.kept:
        log.info("kept    %s (exists; never overwritten)", path)
    return report
