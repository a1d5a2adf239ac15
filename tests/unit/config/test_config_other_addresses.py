"""An instance's `app.otherAddresses`: further IPs of the same app (a dual-stack pod's address of
its other family), parsed into canonical text, every bad entry reported at its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshproxy.config import load
from meshproxy.config.loader import load_text

MESH = """\
apiVersion: meshproxy.io/v1alpha1
kind: Mesh
metadata:
  name: m
spec:
  services:
    - name: web
      instances:
        - name: web-0
          app:
            address: "10.1.2.3:8080"
            otherAddresses: {others}
        - {{name: web-1, app: {{address: "[FD00::4]:8080"}}}}
"""


def errors(tmp_path: Path, others: str) -> list[str]:
    path = tmp_path / "m.yaml"
    path.write_text(MESH.format(others=others))
    return [str(d).replace(f"{tmp_path}/", "") for d in load([str(path)]).errors]


def test_other_addresses_are_kept_in_canonical_text() -> None:
    snap = load_text(MESH.format(others='["FD00:0:0::3", 10.1.9.3]'))
    web0, web1 = snap.services["web.default"].instances
    assert web0.other_app_hosts == ("fd00::3", "10.1.9.3")
    assert web0.app_address == "10.1.2.3:8080"  # the address the instance is dialled at
    assert web1.other_app_hosts == ()
    # `/config` shows them
    exported = json.loads(json.dumps(snap.to_json()))["services"]["web.default"]["instances"]
    assert [i["otherAppHosts"] for i in exported] == [["fd00::3", "10.1.9.3"], []]


def test_an_empty_list_is_no_other_address() -> None:
    [web0, _] = load_text(MESH.format(others="[]")).services["web.default"].instances
    assert web0.other_app_hosts == ()


@pytest.mark.parametrize(("others", "message"), [
    ('["[fd00::3]:8080"]', "30: spec.services[0].instances[0].app.otherAddresses[0]: '[fd00::3]:8080' is not "
                           "an IP address (no port: the app's port is the one of 'address')"),
    ("[web-0.local]", "30: spec.services[0].instances[0].app.otherAddresses[0]: 'web-0.local' is not "
                      "an IP address (no port: the app's port is the one of 'address')"),
    ("[3]", "30: spec.services[0].instances[0].app.otherAddresses[0]: expected a string, got an integer (3)"),
    ("fd00::3", "29: spec.services[0].instances[0].app.otherAddresses: expected a list, got a string ('fd00::3')"),
])
def test_an_entry_that_is_not_an_ip_is_an_error_at_its_line(tmp_path: Path, others: str, message: str) -> None:
    assert errors(tmp_path, others) == [f"m.yaml:12:{message}"]


def test_the_apps_own_address_is_an_error(tmp_path: Path) -> None:
    assert errors(tmp_path, "[fd00::3, 10.1.2.3]") == [
        "m.yaml:12:39: spec.services[0].instances[0].app.otherAddresses[1]: "
        "'10.1.2.3' is the app's own address",
    ]


def test_an_address_given_twice_is_an_error_whatever_its_spelling(tmp_path: Path) -> None:
    assert errors(tmp_path, '[fd00::3, "FD00:0::3"]') == [
        "m.yaml:12:39: spec.services[0].instances[0].app.otherAddresses[1]: "
        "'FD00:0::3' is given twice (first at line 12)",
    ]


def test_the_field_is_named_among_the_allowed_ones(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MESH.format(others="[fd00::3]").replace("otherAddresses", "otherAddress"))
    [error] = [str(d) for d in load([str(path)]).errors]
    assert "unknown field 'otherAddress' (allowed: address, command, otherAddresses)" in error
