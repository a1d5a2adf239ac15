"""A control plane with `--ca-dir` across an issuer renewal: it warns that the issuer is due,
an operator runs the real `meshproxy ca renew-issuer`, and without a restart the control plane
signs with the new issuer (the trust bundle unchanged), reports its end in /metrics, and goes
back to the old one when the operator renames the kept pair back.

The control plane runs in this process (serve_control) so that it looks at the folder every
50 ms instead of every 10 s; it serves on a real socket and is asked as a proxy asks it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from meshproxy.control.run import serve_control
from meshproxy.identity.ca import init_ca
from meshproxy.identity.csr import make_csr, new_key
from meshproxy.identity.tokens import BootstrapTokens
from support.polling import until as poll_until
from support.proxy import free_ports

DEADLINE = 20.0
DAY = 86400.0
WEB = "spiffe://cluster.local/ns/default/sa/web"


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    await poll_until(condition, what, DEADLINE)


def issuer_file(folder) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "issuer.crt").read_bytes())


def messages(caplog, text: str, level: int = logging.INFO) -> list[str]:
    """Messages logged at `level` or above since the fixture started that contain `text`."""
    records = caplog.get_records("setup") + caplog.get_records("call")
    return [r.getMessage() for r in records if text in r.getMessage() and r.levelno >= level]


def expiry_metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.fixture
async def control(tmp_path, caplog):
    """A control plane on a CA whose issuer was made 300 days ago (so it is due); yields
    (url, CA folder, the web token)."""
    caplog.set_level(logging.INFO, logger="meshproxy")
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, "cluster.local", clock=lambda: time.time() - 300 * DAY)
    token = BootstrapTokens(tmp_path / "tokens", "cluster.local").issue("default", "web").read_text()
    listen = f"127.0.0.1:{free_ports(1)[0]}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve_control([], listen, ca_dir=str(ca_dir), tokens_dir=str(tmp_path / "tokens"),
                                             stop=stop, ca_reload_every=0.05))
    url = f"http://{listen}"
    async with aiohttp.ClientSession() as http:
        async def up() -> bool:
            try:
                async with http.get(url + "/live") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until(up, "the control plane listening")
    try:
        yield url, ca_dir, token
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0


async def certificate(url: str, token: str) -> list[x509.Certificate]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/certificates", json={"csr": make_csr(new_key()).decode(),
                                                             "token": token}) as response:
            body = await response.json()
            assert response.status == 200, body
    return x509.load_pem_x509_certificates(body["certificate_chain"].encode())


async def get(url: str, path: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + path) as response:
            assert response.status == 200
            return await response.text()


async def test_a_renewed_issuer_is_signed_with_without_a_restart_and_can_be_rolled_back(control, caplog):
    url, ca_dir, token = control
    old_issuer = issuer_file(ca_dir)
    bundle = await get(url, "/v1/trust-bundle")  # what every proxy holds
    assert (await certificate(url, token))[1] == old_issuer
    metric = "meshproxy_control_issuer_expiry_timestamp_seconds"
    assert expiry_metric(await get(url, "/metrics"), metric) == old_issuer.not_valid_after_utc.timestamp()
    root_end = x509.load_pem_x509_certificate(bundle.encode()).not_valid_after_utc.timestamp()
    assert expiry_metric(await get(url, "/metrics"), "meshproxy_control_trust_anchor_expiry_timestamp_seconds") \
        == root_end

    # Due (past two thirds of its year): said at start, with what to run.
    advice = f"run `meshproxy ca renew-issuer --dir {ca_dir}`"
    assert len(messages(caplog, advice, logging.WARNING)) == 1
    [started] = messages(caplog, "is in force")
    assert f"serial {old_issuer.serial_number:x}" in started

    # The operator renews it with the real command.
    renew = await asyncio.create_subprocess_exec(sys.executable, "-m", "meshproxy", "ca", "renew-issuer",
                                                 "--dir", str(ca_dir), stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(renew.communicate(), DEADLINE)
    assert renew.returncode == 0, err.decode()
    new_issuer = issuer_file(ca_dir)
    assert new_issuer != old_issuer

    async def signs_with(issuer: x509.Certificate) -> bool:
        return (await certificate(url, token))[1] == issuer

    await until(lambda: signs_with(new_issuer), "certificates from the new issuer")
    leaf, sent = await certificate(url, token)
    # A proxy with the trust bundle it had before verifies the new chain.
    assert await get(url, "/v1/trust-bundle") == bundle
    verifier = (PolicyBuilder().store(Store(x509.load_pem_x509_certificates(bundle.encode())))
                .time(datetime.now(timezone.utc)).build_client_verifier())
    verifier.verify(leaf, [sent])
    assert expiry_metric(await get(url, "/metrics"), metric) == new_issuer.not_valid_after_utc.timestamp()
    [switched] = messages(caplog, "the issuer in force is now")
    assert f"serial {new_issuer.serial_number:x}" in switched and f"was serial {old_issuer.serial_number:x}" in switched
    # The folder was looked at many times meanwhile (every 50 ms); the advice was given once a day.
    assert len(messages(caplog, advice, logging.WARNING)) == 1

    # Rollback: the kept pair renamed back.
    os.replace(ca_dir / "issuer.key.old", ca_dir / "issuer.key")
    os.replace(ca_dir / "issuer.crt.old", ca_dir / "issuer.crt")
    await until(lambda: signs_with(old_issuer), "certificates from the old issuer again")
    # The old issuer is due again: an issuer newly in force is said of at once.
    assert len(messages(caplog, advice, logging.WARNING)) == 2


async def test_a_folder_that_does_not_load_keeps_the_issuer_in_use(control, caplog):
    url, ca_dir, token = control
    old_issuer = issuer_file(ca_dir)
    (ca_dir / "issuer.key").write_bytes(b"not a key")
    await until(lambda: asyncio.sleep(0, bool(messages(caplog, "cannot load the CA", logging.WARNING))),
                "the failed load logged")
    assert (await certificate(url, token))[1] == old_issuer
