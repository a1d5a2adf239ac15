"""The proxy's reading of a control plane's `Retry-After` (delay-seconds, RFC 9110 §10.2.3)."""

import pytest

from meshproxy.identity.client import _retry_after


@pytest.mark.parametrize("value, seconds", [("5", 5.0), (" 30 ", 30.0), ("0", 0.0)])
def test_delay_seconds(value, seconds):
    assert _retry_after(value) == seconds


@pytest.mark.parametrize("value", [None, "", "soon", "1.5", "-3", "²", "٣",
                                   "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_anything_else_is_no_wait_asked_for(value):
    # A header the proxy cannot read must never end its certificate task (the old reading
    # let "²" through str.isdigit() into float()).
    assert _retry_after(value) is None
