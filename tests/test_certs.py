"""`medfusion-fl certs`: a CA, the SuperLink's TLS certificate and one OpenSSH key per hospital;
private keys 0600, nothing ever overwritten."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfusion_fl.deploy.certs import make_certs
from medfusion_fl.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_are_valid_private_and_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    report = make_certs(out, hosts=["coord.example.org", "127.0.0.1"], sites=["H1", "H2"])
    assert len(report.created) == 8 and report.kept == []
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for private in ("ca.key", "superlink.key", "sites/H1/auth_key", "sites/H2/auth_key"):
        assert _mode(out / private) == 0o600, private
    assert _mode(out / "ca.pem") == 0o644 and _mode(out) == 0o700
    key = serialization.load_ssh_private_key((out / "sites/H1/auth_key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((out / "sites/H1/auth_key.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert (out / "sites/H1/auth_key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = make_certs(out, hosts=["coord.example.org", "127.0.0.1"], sites=["H1", "H2", "H3"])
    assert sorted(p.relative_to(out).as_posix() for p in again.created) == ["sites/H3/auth_key",
                                                                            "sites/H3/auth_key.pub"]
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing rewritten
    with pytest.raises(ConfigError, match="remove superlink.pem and superlink.key"):
        make_certs(out, hosts=["other.example.org"], sites=[])
    assert all(p.read_bytes() == data for p, data in before.items())


def test_certs_refuse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--host"):
        make_certs(tmp_path / "a", hosts=[], sites=["H1"])
    with pytest.raises(ConfigError, match="plain name"):
        make_certs(tmp_path / "b", hosts=["127.0.0.1"], sites=["../evil"])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ca.key").write_text("orphan")
    with pytest.raises(ConfigError, match="only one of ca.key and ca.pem"):
        make_certs(tmp_path / "c", hosts=["127.0.0.1"], sites=[])
