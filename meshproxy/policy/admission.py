"""What an accepted inbound connection is: TLS, plaintext, or refused (spec §3
PeerAuthentication). Pure: the mode, whether the proxy has a certificate and what the first
byte was (or that none came) in, a decision out. The I/O around it (dataplane/tls.py) only
waits, peeks and acts.

The rules:

1. DISABLE: plaintext only, at once; nothing is read first (a TLS ClientHello then fails as a
   malformed request: 400).
2. PERMISSIVE without a certificate: plaintext at once too; there is nothing to terminate TLS
   with, so there is nothing to decide.
3. Otherwise the first byte decides, peeked (MSG_PEEK) so nothing has to be put back. A TLS
   record of content type handshake (22, 0x16: RFC 8446 §5.1, the ClientHello) is TLS; any
   other byte is plaintext in PERMISSIVE and refused in STRICT. A TLS ClientHello without a
   certificate to answer it with is refused.
4. A client that closes before sending a byte is closed, not counted as refused: it asked
   for nothing.
5. A client that sends nothing for the header timeout is refused, as one that sends no
   request head would be. Where silence means a server-first protocol (transparent mode,
   `silence_is_tcp`: MySQL, SMTP... wait for the server's greeting), a PERMISSIVE client
   silent for the protocol-detection timeout is plaintext TCP instead (and the wait is that
   shorter timeout: waiting longer would only delay the greeting). STRICT refuses it still:
   plaintext is never allowed there, silent or not.

States are (mode, has_certificate); the events of rule 3-5 are what the peek saw. The table
`AFTER_PEEK` holds every state that peeks; the states of rules 1 and 2 never reach it.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "AFTER_PEEK",
    "DISABLE",
    "MODES",
    "PERMISSIVE",
    "STRICT",
    "TLS_HANDSHAKE_RECORD",
    "Action",
    "FirstByte",
    "Refusal",
    "after_peek",
    "before_peek",
    "first_byte",
]

# PeerAuthentication modes (spec §3; config/model/common.py MTLS_MODES).
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
MODES = (STRICT, PERMISSIVE, DISABLE)

# RFC 8446 §5.1 (and RFC 5246 §6.2.1): ContentType handshake(22), the first byte of a
# ClientHello record.
TLS_HANDSHAKE_RECORD = 0x16


class Action(Enum):
    """What the I/O code does with an accepted connection (anything but a refusal)."""

    PLAINTEXT = "plaintext"  # start the connection's protocol without TLS
    PLAINTEXT_SILENT = "plaintext-silent"  # the same, for a client known to be server-first
    TLS = "tls"  # terminate TLS with the server context, then start the protocol
    PEEK = "peek"  # wait up to the header timeout for the first byte; then `after_peek`
    PEEK_BRIEFLY = "peek-briefly"  # the same, up to the protocol-detection timeout
    CLOSE = "close"  # the client closed first: close, count nothing


class Refusal(Enum):
    """Why a connection is closed unserved; the value is the metric label
    (`meshproxy_tls_handshakes_total{result="refused-<value>"}`)."""

    NO_DATA = "no-data"  # silent until the wait was over
    PLAINTEXT = "plaintext"  # not TLS, in STRICT
    NO_CERTIFICATE = "no-certificate"  # TLS, but no certificate of our own yet


class FirstByte(Enum):
    """What the peek saw: the events of the table."""

    HANDSHAKE = "handshake"  # a TLS handshake record
    OTHER = "other"  # any other byte
    END = "end"  # end of stream before any byte
    SILENCE = "silence"  # nothing until the wait was over


Decision = Action | Refusal

# (mode, has_certificate, what the peek saw) -> (the decision where silence is a refusal, the
# decision where silence is a server-first TCP client: `silence_is_tcp`). Every state that
# peeks, every event; the two columns differ in one cell only (rule 5).
AFTER_PEEK: dict[tuple[str, bool, FirstByte], tuple[Decision, Decision]] = {
    (STRICT, True, FirstByte.HANDSHAKE): (Action.TLS, Action.TLS),
    (STRICT, True, FirstByte.OTHER): (Refusal.PLAINTEXT, Refusal.PLAINTEXT),
    (STRICT, True, FirstByte.END): (Action.CLOSE, Action.CLOSE),
    (STRICT, True, FirstByte.SILENCE): (Refusal.NO_DATA, Refusal.NO_DATA),
    (STRICT, False, FirstByte.HANDSHAKE): (Refusal.NO_CERTIFICATE, Refusal.NO_CERTIFICATE),
    (STRICT, False, FirstByte.OTHER): (Refusal.PLAINTEXT, Refusal.PLAINTEXT),
    (STRICT, False, FirstByte.END): (Action.CLOSE, Action.CLOSE),
    (STRICT, False, FirstByte.SILENCE): (Refusal.NO_DATA, Refusal.NO_DATA),
    (PERMISSIVE, True, FirstByte.HANDSHAKE): (Action.TLS, Action.TLS),
    (PERMISSIVE, True, FirstByte.OTHER): (Action.PLAINTEXT, Action.PLAINTEXT),
    (PERMISSIVE, True, FirstByte.END): (Action.CLOSE, Action.CLOSE),
    (PERMISSIVE, True, FirstByte.SILENCE): (Refusal.NO_DATA, Action.PLAINTEXT_SILENT),
}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{mode!r} is not a PeerAuthentication mode ({', '.join(MODES)})")


def before_peek(mode: str, has_certificate: bool, silence_is_tcp: bool = False) -> Action:
    """Return what to do with a connection just accepted: Action.PLAINTEXT (rules 1, 2),
    Action.PEEK (wait up to the header timeout for the first byte), or Action.PEEK_BRIEFLY
    (wait up to the protocol-detection timeout: silence would be a server-first client, rule
    5). Raises ValueError for an unknown `mode`."""
    _check_mode(mode)
    if mode == DISABLE or mode == PERMISSIVE and not has_certificate:
        return Action.PLAINTEXT
    if AFTER_PEEK[(mode, has_certificate, FirstByte.SILENCE)][silence_is_tcp] is Action.PLAINTEXT_SILENT:
        return Action.PEEK_BRIEFLY
    return Action.PEEK


def first_byte(peeked: bytes | None) -> FirstByte:
    """Return the event for what a peek returned: `None` when the wait ended with nothing,
    b"" at end of stream, else the bytes read (only the first is looked at)."""
    if peeked is None:
        return FirstByte.SILENCE
    if not peeked:
        return FirstByte.END
    return FirstByte.HANDSHAKE if peeked[0] == TLS_HANDSHAKE_RECORD else FirstByte.OTHER


def after_peek(mode: str, peeked: bytes | None, has_certificate: bool,
               silence_is_tcp: bool = False) -> Decision:
    """Return what to do with a connection once its first byte is known (`peeked` as
    `first_byte` takes it): Action.TLS, Action.PLAINTEXT, Action.PLAINTEXT_SILENT (silent, and
    `silence_is_tcp`), Action.CLOSE (end of stream), or a Refusal. Raises ValueError for an
    unknown `mode`, or for a state `before_peek` does not peek in."""
    _check_mode(mode)
    try:
        cell = AFTER_PEEK[(mode, has_certificate, first_byte(peeked))]
    except KeyError:
        raise ValueError(f"{mode} {'with' if has_certificate else 'without'} a certificate "
                         "never peeks") from None
    return cell[silence_is_tcp]
