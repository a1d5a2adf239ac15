"""The inbound admission decision (policy/admission.py, spec §3 PeerAuthentication): every
mode × certificate × first byte (or silence, or end of stream) × what silence means, before
and after the peek."""

from __future__ import annotations

import itertools

import pytest

from meshproxy.config.model.common import MTLS_MODES
from meshproxy.policy.admission import (
    AFTER_PEEK,
    DISABLE,
    MODES,
    PERMISSIVE,
    STRICT,
    TLS_HANDSHAKE_RECORD,
    Action,
    FirstByte,
    Refusal,
    after_peek,
    before_peek,
    first_byte,
)

CLIENT_HELLO = bytes([TLS_HANDSHAKE_RECORD, 0x03, 0x01])  # a TLS record header's start
HTTP = b"GET / HTTP/1.1\r\n"
END = b""
SILENCE = None

# --- before the peek: (mode, has_certificate, silence_is_tcp) -> action ---------------------

BEFORE = [
    (DISABLE, False, False, Action.PLAINTEXT),
    (DISABLE, False, True, Action.PLAINTEXT),
    (DISABLE, True, False, Action.PLAINTEXT),
    (DISABLE, True, True, Action.PLAINTEXT),
    (PERMISSIVE, False, False, Action.PLAINTEXT),  # nothing to terminate TLS with
    (PERMISSIVE, False, True, Action.PLAINTEXT),
    (PERMISSIVE, True, False, Action.PEEK),
    (PERMISSIVE, True, True, Action.PEEK_BRIEFLY),  # silence would be a server-first client
    (STRICT, False, False, Action.PEEK),  # to refuse with the right reason
    (STRICT, False, True, Action.PEEK),
    (STRICT, True, False, Action.PEEK),
    (STRICT, True, True, Action.PEEK),  # silence is refused in STRICT: no shorter wait
]


def test_the_before_table_covers_every_state() -> None:
    assert sorted(row[:3] for row in BEFORE) == sorted(
        itertools.product(MODES, (False, True), (False, True)))


@pytest.mark.parametrize(("mode", "certificate", "silence_is_tcp", "action"), BEFORE)
def test_before_peek(mode, certificate, silence_is_tcp, action) -> None:
    assert before_peek(mode, certificate, silence_is_tcp) is action


# --- after the peek: (mode, has_certificate, first bytes, silence_is_tcp) -> decision -------

AFTER = [
    (STRICT, True, CLIENT_HELLO, False, Action.TLS),
    (STRICT, True, CLIENT_HELLO, True, Action.TLS),
    (STRICT, True, HTTP, False, Refusal.PLAINTEXT),
    (STRICT, True, HTTP, True, Refusal.PLAINTEXT),
    (STRICT, True, END, False, Action.CLOSE),
    (STRICT, True, END, True, Action.CLOSE),
    (STRICT, True, SILENCE, False, Refusal.NO_DATA),
    (STRICT, True, SILENCE, True, Refusal.NO_DATA),  # plaintext never, silent or not
    (STRICT, False, CLIENT_HELLO, False, Refusal.NO_CERTIFICATE),
    (STRICT, False, CLIENT_HELLO, True, Refusal.NO_CERTIFICATE),
    (STRICT, False, HTTP, False, Refusal.PLAINTEXT),
    (STRICT, False, HTTP, True, Refusal.PLAINTEXT),
    (STRICT, False, END, False, Action.CLOSE),
    (STRICT, False, END, True, Action.CLOSE),
    (STRICT, False, SILENCE, False, Refusal.NO_DATA),
    (STRICT, False, SILENCE, True, Refusal.NO_DATA),
    (PERMISSIVE, True, CLIENT_HELLO, False, Action.TLS),
    (PERMISSIVE, True, CLIENT_HELLO, True, Action.TLS),
    (PERMISSIVE, True, HTTP, False, Action.PLAINTEXT),
    (PERMISSIVE, True, HTTP, True, Action.PLAINTEXT),
    (PERMISSIVE, True, END, False, Action.CLOSE),
    (PERMISSIVE, True, END, True, Action.CLOSE),
    (PERMISSIVE, True, SILENCE, False, Refusal.NO_DATA),  # as a client sending no request head
    (PERMISSIVE, True, SILENCE, True, Action.PLAINTEXT_SILENT),  # a server-first TCP client
]

PEEKING_STATES = [(mode, certificate) for mode, certificate, silence_is_tcp, action in BEFORE
                  if action is not Action.PLAINTEXT and not silence_is_tcp]


def test_the_after_table_covers_every_state_that_peeks_and_every_event() -> None:
    cells = {(mode, cert, event) for (mode, cert), event in itertools.product(PEEKING_STATES, FirstByte)}
    rows = [(mode, cert, first_byte(seen), tcp) for mode, cert, seen, tcp, _ in AFTER]
    assert len(rows) == len(set(rows))
    assert set(rows) == {cell + (tcp,) for cell in cells for tcp in (False, True)}
    assert set(AFTER_PEEK) == cells


@pytest.mark.parametrize(("mode", "certificate", "peeked", "silence_is_tcp", "decision"), AFTER)
def test_after_peek(mode, certificate, peeked, silence_is_tcp, decision) -> None:
    assert after_peek(mode, peeked, certificate, silence_is_tcp) is decision


@pytest.mark.parametrize(("mode", "certificate"), [(DISABLE, False), (DISABLE, True),
                                                    (PERMISSIVE, False)])
def test_a_state_that_never_peeks_has_no_after(mode, certificate) -> None:
    with pytest.raises(ValueError, match="never peeks"):
        after_peek(mode, HTTP, certificate)


@pytest.mark.parametrize("call", [lambda: before_peek("strict", True),
                                  lambda: after_peek("UNSET", HTTP, True)])
def test_an_unknown_mode_is_an_error(call) -> None:
    with pytest.raises(ValueError, match="not a PeerAuthentication mode"):
        call()


# --- the events, and the values the I/O code relies on -------------------------------------


@pytest.mark.parametrize(("peeked", "event"), [
    (None, FirstByte.SILENCE),
    (b"", FirstByte.END),
    (b"\x16", FirstByte.HANDSHAKE),
    (CLIENT_HELLO, FirstByte.HANDSHAKE),
    (b"\x15", FirstByte.OTHER),  # an alert record is no ClientHello
    (b"G", FirstByte.OTHER),
    (b"\x00", FirstByte.OTHER),
    (b"?", FirstByte.OTHER),  # what a spurious wake-up is taken as
])
def test_first_byte(peeked, event) -> None:
    assert first_byte(peeked) is event


def test_the_modes_are_the_configurations() -> None:
    assert set(MODES) == set(MTLS_MODES)


def test_refusal_reasons_are_the_metric_labels() -> None:
    # meshproxy_tls_handshakes_total{result="refused-<reason>"}: dashboards read these.
    assert {r.value for r in Refusal} == {"no-data", "plaintext", "no-certificate"}


def test_a_decision_is_an_action_or_a_refusal_never_both() -> None:
    decisions = {d for row in AFTER_PEEK.values() for d in row}
    assert all(isinstance(d, (Action, Refusal)) for d in decisions)
    assert not decisions & {Action.PEEK, Action.PEEK_BRIEFLY}  # the peek is over
