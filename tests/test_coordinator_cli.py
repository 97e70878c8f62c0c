"""`fedbot-coordinator` credentials, robots' own keys, and clear errors for settings that cannot work."""

import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

BIN = Path(sys.executable).parent


def coordinator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedbot-coordinator"), *args], capture_output=True, text=True, timeout=120)


def test_credentials_make_a_ca_signed_server_certificate_and_keep_the_ca(tmp_path):
    out = tmp_path / "tls"
    result = coordinator("credentials", "--out", str(out), "--host", "127.0.0.1", "--host", "lab.local")
    assert result.returncode == 0, result.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["lab.local", "localhost"]  # the SuperLink behind the gateway
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]  # no robot keys

    before = (out / "ca.crt").read_bytes()  # again, for another host: the CA stays as it is
    assert coordinator("credentials", "--out", str(out), "--host", "lab2.local").returncode == 0
    assert (out / "ca.crt").read_bytes() == before


def test_a_robot_makes_its_own_key_and_only_the_public_half_leaves_it(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('robot-id = "robot1"\n[coordinator]\nauth-key = "keys/supernode"\n')
    result = subprocess.run(
        [str(BIN / "fedbot-agent"), "--config", str(config), "--keygen"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "keys" / "supernode", tmp_path / "keys" / "supernode.pub"
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert key.public_key() == load_ssh_public_key(public.read_bytes())
    assert result.stdout == public.read_text()  # what the operator copies to the lab server
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()  # a second keygen keeps the registered key
    subprocess.run([str(BIN / "fedbot-agent"), "--config", str(config), "--keygen"], check=True, timeout=120)
    assert private.read_bytes() == before


def test_settings_that_cannot_work_are_refused_with_the_reason(tmp_path):
    result = coordinator("run", "--state-dir", str(tmp_path / "s"), "--auth")
    assert result.returncode == 2 and "authentication needs TLS" in result.stderr
    (tmp_path / "tls").mkdir()
    result = coordinator("run", "--state-dir", str(tmp_path / "s"), "--tls", str(tmp_path / "tls"))
    assert result.returncode == 2 and "server.pem" in result.stderr
    result = coordinator("run", "--state-dir", str(tmp_path / "s"), "--register", str(tmp_path / "nope.pub"))
    assert result.returncode == 2 and "nope.pub" in result.stderr
    result = coordinator("run", "--state-dir", str(tmp_path / "s"), "--log-backups", "0")
    assert result.returncode == 2 and "--log-max-mb / --log-backups" in result.stderr
    result = coordinator("serve", "--state-dir", str(tmp_path / "s"), "--keep-runs", "0")
    assert result.returncode == 2 and "--keep-runs must lie in [1, 100000]" in result.stderr
