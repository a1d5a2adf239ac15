"""The control plane's `--ca-dir` folder (meshproxy.control.run.CAFolder): a changed issuer is
put in force, a folder that does not load is not, and the advice to renew (or to replace the
trust anchor) is given once a day. Files in a temporary folder; the clock is a fake one."""

from __future__ import annotations

import logging
import os
import time

import pytest

from meshproxy.control.ca_api import CASlot
from meshproxy.control.run import DUE_WARNING_EVERY, CAFolder
from meshproxy.identity.ca import ROOT_LIFETIME, CertificateAuthority, init_ca
from meshproxy.identity.cli import renew_issuer_files

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def folder_with_ca(path, age_days: float, trust_domain: str = "cluster.local") -> CAFolder:
    init_ca(path, trust_domain, clock=lambda: time.time() - age_days * DAY)
    return CAFolder(str(path), CASlot(CertificateAuthority.load(path)), clock=Clock())


def said(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_renewed_issuer_is_put_in_force_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshproxy")
    folder = folder_with_ca(tmp_path, 10)
    old = folder.slot.ca
    assert folder.check() is False and folder.slot.ca is old
    renew_issuer_files(tmp_path)
    assert folder.check() is True
    assert folder.slot.ca.issuer != old.issuer and folder.slot.ca.trust_bundle() == old.trust_bundle()
    assert folder.check() is False
    [record] = said(caplog, "the issuer in force is now")
    assert f"{folder.slot.ca.issuer.serial_number:x}" in record.getMessage()


def test_a_pair_caught_between_two_renames_keeps_the_issuer_in_use_until_the_second(tmp_path, caplog):
    folder = folder_with_ca(tmp_path, 10)
    old = folder.slot.ca
    spare = tmp_path / "spare"
    renew_issuer_files(tmp_path)  # the new pair, then put the old certificate back beside the new key
    os.replace(tmp_path / "issuer.crt", spare)
    os.replace(tmp_path / "issuer.crt.old", tmp_path / "issuer.crt")
    assert folder.check() is False and folder.slot.ca is old
    assert folder.check() is False
    [warning] = said(caplog, "cannot load the CA")  # once, not on every look
    assert warning.levelno == logging.WARNING and "keeping issuer" in warning.getMessage()
    os.replace(spare, tmp_path / "issuer.crt")
    assert folder.check() is True and folder.slot.ca.issuer != old.issuer


def test_a_ca_of_another_trust_domain_is_not_put_in_force(tmp_path, caplog):
    folder = folder_with_ca(tmp_path / "a", 10)
    old = folder.slot.ca
    init_ca(tmp_path / "b", "other.example")
    for name in ("root.crt", "issuer.crt", "issuer.key"):
        os.replace(tmp_path / "b" / name, tmp_path / "a" / name)
    assert folder.check() is False and folder.slot.ca is old
    [error] = said(caplog, "trust domain other.example")
    assert error.levelno == logging.ERROR and "restart" in error.getMessage()


def test_a_due_issuer_is_said_of_once_a_day(tmp_path, caplog):
    folder = folder_with_ca(tmp_path, 250)
    advice = f"run `meshproxy ca renew-issuer --dir {tmp_path}`"
    folder.check()
    folder.clock.now += DUE_WARNING_EVERY - 60
    folder.check()
    assert len(said(caplog, advice)) == 1
    folder.clock.now += 60
    folder.check()
    assert [r.levelno for r in said(caplog, advice)] == [logging.WARNING, logging.WARNING]
    assert not said(caplog, "trust anchor")


@pytest.mark.parametrize("age_days", [10, 200])
def test_an_issuer_not_yet_due_is_not_said_of(tmp_path, caplog, age_days):
    folder_with_ca(tmp_path, age_days).check()
    assert not caplog.records


def test_a_trust_anchor_near_its_end_is_an_error_once_a_day(tmp_path, caplog):
    folder = folder_with_ca(tmp_path, ROOT_LIFETIME / DAY - 200)
    folder.check()
    folder.check()
    [error] = said(caplog, "the trust anchor")
    assert error.levelno == logging.ERROR and "root.crt ends on" in error.getMessage()
    assert "docs/security.md" in error.getMessage()
    folder.clock.now += DUE_WARNING_EVERY
    folder.check()
    assert len(said(caplog, "the trust anchor")) == 2


def test_a_file_refused_then_made_readable_is_loaded(tmp_path, monkeypatch, caplog):
    """A renewed issuer.key the control plane may not read (written by another user) is
    refused; the chmod or chown that fixes it changes only the file's ctime, and is enough."""
    folder = folder_with_ca(tmp_path, 10)
    old = folder.slot.ca
    renew_issuer_files(tmp_path)
    real_load = CertificateAuthority.load

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "issuer.key"))

    monkeypatch.setattr(CertificateAuthority, "load", staticmethod(refused))
    assert folder.check() is False and folder.slot.ca is old
    assert said(caplog, "cannot load the CA")
    monkeypatch.setattr(CertificateAuthority, "load", staticmethod(real_load))
    assert folder.check() is False  # nothing changed on disk yet: not tried again
    deadline = time.monotonic() + 5
    before = os.stat(tmp_path / "issuer.key").st_ctime_ns
    while os.stat(tmp_path / "issuer.key").st_ctime_ns == before:  # ctime has a clock tick's grain
        assert time.monotonic() < deadline
        os.chmod(tmp_path / "issuer.key", 0o600)
    assert folder.check() is True and folder.slot.ca.issuer != old.issuer
