"""`meshproxy ca init` and `meshproxy ca bundle`, as a user types them."""

from __future__ import annotations

import argparse
import io
import stat

import pytest
from cryptography import x509

from meshproxy.identity import cli


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
