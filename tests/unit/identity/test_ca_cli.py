"""`meshproxy ca init`, `meshproxy ca bundle` and `meshproxy ca renew-issuer`, as a user types
them. For renew-issuer: the files it leaves in the CA folder, their modes, the copy of the
replaced pair that a rollback renames back, and what it says. CAs made "long ago" are made
with a fake clock; the command itself runs at the real time."""

from __future__ import annotations

import argparse
import io
import os
import stat
import time

import pytest
from cryptography import x509

from meshproxy.identity import cli
from meshproxy.identity.ca import ISSUER_LIFETIME, ROOT_LIFETIME, CertificateAuthority, init_ca


def meshproxy_ca(*argv: str) -> tuple[int, str, str]:
    """Parse `meshproxy ca ARGV...` with the subcommand registered as meshproxy.cli would, run
    it; return (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="meshproxy")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ca", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_init_makes_a_ca_and_says_where_and_until_when(tmp_path):
    code, out, err = meshproxy_ca("init", "--dir", str(tmp_path / "ca"), "--trust-domain", "mesh.example")
    assert code == 0, err
    assert "trust domain mesh.example" in out and str(tmp_path / "ca" / "root.crt") in out and "until" in out
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ca").iterdir()}
    assert files == {"root.crt": 0o644, "root.key": 0o600, "issuer.crt": 0o644, "issuer.key": 0o600}
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700


def test_the_trust_domain_defaults_to_cluster_local(tmp_path):
    assert meshproxy_ca("init", "--dir", str(tmp_path))[0] == 0
    root = x509.load_pem_x509_certificate((tmp_path / "root.crt").read_bytes())
    assert root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]


def test_bundle_prints_the_root_certificate(tmp_path):
    meshproxy_ca("init", "--dir", str(tmp_path))
    code, out, _ = meshproxy_ca("bundle", "--dir", str(tmp_path))
    assert code == 0
    assert out == (tmp_path / "root.crt").read_text()
    assert x509.load_pem_x509_certificates(out.encode())[0].subject.rfc4514_string().startswith("CN=meshproxy root CA")


def test_a_second_init_refuses_to_overwrite(tmp_path):
    meshproxy_ca("init", "--dir", str(tmp_path))
    before = (tmp_path / "root.crt").read_bytes()
    code, _, err = meshproxy_ca("init", "--dir", str(tmp_path))
    assert code == 1 and "already holds a CA" in err
    assert (tmp_path / "root.crt").read_bytes() == before


def test_bundle_of_a_folder_without_a_ca_says_how_to_make_one(tmp_path):
    code, out, err = meshproxy_ca("bundle", "--dir", str(tmp_path))
    assert code == 1 and out == ""
    assert f"meshproxy ca init --dir {tmp_path}" in err


def test_an_invalid_trust_domain_is_refused(tmp_path):
    code, _, err = meshproxy_ca("init", "--dir", str(tmp_path / "ca"), "--trust-domain", "Bad Domain")
    assert code == 1 and "invalid trust domain 'Bad Domain'" in err


def test_a_folder_that_cannot_be_written_is_reported(tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = meshproxy_ca("init", "--dir", str(tmp_path / "file" / "ca"))
    assert code == 1 and "meshproxy ca init:" in err


def test_ca_without_a_subcommand_shows_usage():
    code, _, err = meshproxy_ca()
    assert code == 2 and "init" in err and "bundle" in err


def test_dir_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        meshproxy_ca("bundle")
    assert exit_.value.code == 2 and "--dir" in capsys.readouterr().err


# -- renew-issuer ---------------------------------------------------------------------------
DAY = 86400.0


def made_days_ago(folder, days: float) -> None:
    init_ca(folder, "cluster.local", clock=lambda: time.time() - days * DAY)


def modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_renew_issuer_puts_a_new_issuer_in_place_and_keeps_the_old_pair(tmp_path):
    ca_dir = tmp_path / "ca"
    made_days_ago(ca_dir, 300)
    before = {name: (ca_dir / name).read_bytes() for name in ("root.crt", "root.key", "issuer.crt", "issuer.key")}
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        code, out, err = meshproxy_ca("renew-issuer", "--dir", str(ca_dir))
    finally:
        os.umask(old)
    assert code == 0, err
    assert modes(ca_dir) == {"root.crt": 0o644, "root.key": 0o600, "issuer.crt": 0o644, "issuer.key": 0o600,
                             "issuer.crt.old": 0o644, "issuer.key.old": 0o600}
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    # The root is untouched (the trust bundle is the same); the old pair is kept byte for byte.
    assert (ca_dir / "root.crt").read_bytes() == before["root.crt"]
    assert (ca_dir / "root.key").read_bytes() == before["root.key"]
    assert (ca_dir / "issuer.crt.old").read_bytes() == before["issuer.crt"]
    assert (ca_dir / "issuer.key.old").read_bytes() == before["issuer.key"]
    new = cert(ca_dir / "issuer.crt")
    assert (ca_dir / "issuer.crt").read_bytes() != before["issuer.crt"]
    new.verify_directly_issued_by(cert(ca_dir / "root.crt"))
    assert abs(new.not_valid_after_utc.timestamp() - (time.time() + ISSUER_LIFETIME)) < 60
    ca = CertificateAuthority.load(ca_dir)  # the key matches the certificate
    assert ca.issuer == new
    assert f"new issuer {ca_dir}/issuer.crt" in out and f"serial {new.serial_number:x}" in out
    assert "issuer.crt.old" in out and err == ""


def test_the_old_pair_renamed_back_is_a_working_rollback(tmp_path):
    made_days_ago(tmp_path, 300)
    old_issuer = cert(tmp_path / "issuer.crt")
    assert meshproxy_ca("renew-issuer", "--dir", str(tmp_path))[0] == 0
    os.replace(tmp_path / "issuer.key.old", tmp_path / "issuer.key")
    os.replace(tmp_path / "issuer.crt.old", tmp_path / "issuer.crt")
    assert CertificateAuthority.load(tmp_path).issuer == old_issuer
    assert stat.S_IMODE((tmp_path / "issuer.key").stat().st_mode) == 0o600


def test_a_second_renewal_keeps_the_pair_the_first_one_made(tmp_path):
    made_days_ago(tmp_path, 300)
    meshproxy_ca("renew-issuer", "--dir", str(tmp_path))
    first = (tmp_path / "issuer.crt").read_bytes()
    assert meshproxy_ca("renew-issuer", "--dir", str(tmp_path))[0] == 0
    assert (tmp_path / "issuer.crt.old").read_bytes() == first
    assert (tmp_path / "issuer.crt").read_bytes() != first
    # Nothing half-written is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "issuer.crt", "issuer.crt.old", "issuer.key", "issuer.key.old", "root.crt", "root.key"]


def test_if_due_leaves_a_young_issuer_alone_and_says_until_when(tmp_path):
    made_days_ago(tmp_path, 10)
    before = (tmp_path / "issuer.crt").read_bytes()
    code, out, err = meshproxy_ca("renew-issuer", "--dir", str(tmp_path), "--if-due")
    assert code == 0, err
    assert "is not due for renewal before" in out and "nothing written" in out
    assert (tmp_path / "issuer.crt").read_bytes() == before and not (tmp_path / "issuer.crt.old").exists()


def test_if_due_renews_an_issuer_past_two_thirds_of_its_life(tmp_path):
    made_days_ago(tmp_path, 250)
    before = (tmp_path / "issuer.crt").read_bytes()
    code, out, _ = meshproxy_ca("renew-issuer", "--dir", str(tmp_path), "--if-due")
    assert code == 0 and "new issuer" in out
    assert (tmp_path / "issuer.crt").read_bytes() != before


def test_without_the_root_key_nothing_is_written(tmp_path):
    made_days_ago(tmp_path, 300)
    (tmp_path / "root.key").unlink()
    before = modes(tmp_path)
    code, out, err = meshproxy_ca("renew-issuer", "--dir", str(tmp_path))
    assert code == 1 and out == ""
    assert f"{tmp_path} has no root.key" in err
    assert modes(tmp_path) == before


def test_a_root_key_of_another_ca_is_refused(tmp_path):
    made_days_ago(tmp_path / "a", 300)
    made_days_ago(tmp_path / "b", 1)
    os.replace(tmp_path / "b" / "root.key", tmp_path / "a" / "root.key")
    before = (tmp_path / "a" / "issuer.crt").read_bytes()
    code, _, err = meshproxy_ca("renew-issuer", "--dir", str(tmp_path / "a"))
    assert code == 1 and "the root key does not belong to the root certificate" in err
    assert (tmp_path / "a" / "issuer.crt").read_bytes() == before


def test_a_root_near_its_end_gives_an_issuer_that_ends_with_it_and_says_so(tmp_path):
    made_days_ago(tmp_path, ROOT_LIFETIME / DAY - 100)
    code, out, err = meshproxy_ca("renew-issuer", "--dir", str(tmp_path))
    assert code == 0 and "new issuer" in out
    assert cert(tmp_path / "issuer.crt").not_valid_after_utc == cert(tmp_path / "root.crt").not_valid_after_utc
    assert "the trust anchor" in err and "replace the trust anchor" in err


def test_a_folder_without_a_ca_says_so(tmp_path):
    code, _, err = meshproxy_ca("renew-issuer", "--dir", str(tmp_path))
    assert code == 1 and "has no root.crt" in err


def test_the_subcommand_is_listed_in_the_usage():
    code, _, err = meshproxy_ca()
    assert code == 2 and "renew-issuer" in err


def test_renew_issuer_needs_dir(capsys):
    with pytest.raises(SystemExit) as exc:
        meshproxy_ca("renew-issuer", "--if-due")
    assert exc.value.code == 2 and "--dir" in capsys.readouterr().err
