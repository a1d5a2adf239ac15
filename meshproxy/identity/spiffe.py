"""SPIFFE IDs of workloads and the identity layer's errors (pure: strings in, strings out).

A workload's identity is `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT` (spec §5;
outside Kubernetes the service account is the service name). The characters allowed are those
of the SPIFFE ID standard (SPIFFE-ID §2.1, §2.2): a trust domain of lowercase letters, digits,
`.`, `-` and `_`; path segments of letters, digits, `.`, `-` and `_`, never empty, `.` or `..`.
"""

from __future__ import annotations

import re

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(ValueError):
    """An identity, certificate request or certificate that cannot be accepted."""


class CSRError(IdentityError):
    """A certificate signing request that is malformed, badly signed or of the wrong key type."""


class IdentityMismatch(IdentityError):
    """A certificate signing request that asks for another identity than the credential proves."""


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` unchanged; raise IdentityError when it is not a valid one."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain or ""):
        raise IdentityError(f"invalid trust domain {trust_domain!r}: lowercase letters, digits, "
                            "'.', '-' and '_' only")
    return trust_domain


def _check_segment(what: str, value: str) -> str:
    if not _SEGMENT.fullmatch(value or "") or value in (".", ".."):
        raise IdentityError(f"invalid {what} {value!r} in a SPIFFE ID: letters, digits, '.', '-' "
                            "and '_' only")
    return value


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Return `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`; raise IdentityError
    when a part holds characters a SPIFFE ID does not allow."""
    check_trust_domain(trust_domain)
    _check_segment("namespace", namespace)
    _check_segment("service account", service_account)
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def trust_domain_id(trust_domain: str) -> str:
    """Return the trust domain's own SPIFFE ID, `spiffe://TRUST_DOMAIN` (carried by CA
    certificates); raise IdentityError for an invalid trust domain."""
    return SCHEME + check_trust_domain(trust_domain)


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """Return (trust domain, namespace, service account) of a workload's SPIFFE ID; raise
    IdentityError when `uri` is not of the form `spiffe://TD/ns/NS/sa/SA`."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise IdentityError(f"not a SPIFFE ID (must start with {SCHEME}): {uri!r}")
    trust_domain, slash, path = uri[len(SCHEME):].partition("/")
    try:
        check_trust_domain(trust_domain)
        parts = path.split("/")
        if not slash or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError("path must be /ns/NAMESPACE/sa/SERVICE_ACCOUNT")
        _check_segment("namespace", parts[1])
        _check_segment("service account", parts[3])
    except IdentityError as exc:
        raise IdentityError(f"not a workload SPIFFE ID: {uri!r}: {exc}") from None
    return trust_domain, parts[1], parts[3]

