"""`up` tells the control plane every sidecar's inbound port in advance (--sidecar-ports), so
that a control plane it restarts serves them from its first snapshot; the file is what
`meshproxy control` reads back."""

from __future__ import annotations

from pathlib import Path

from meshproxy.control.run import load_sidecar_ports
from meshproxy.local.up import PlannedInstance, control_child, write_sidecar_ports


def planned(name: str, inbound: int, meshed: bool = True) -> PlannedInstance:
    return PlannedInstance(service="account", namespace="default", name=name, app_host="127.0.0.1",
                           app_port=9000, command=None, outbound=1, inbound=inbound, admin=2,
                           health=3, meshed=meshed)


def test_the_planned_ports_go_to_the_control_plane(tmp_path: Path) -> None:
    path = write_sidecar_ports(tmp_path, [planned("account-0", 16006), planned("ext", 0, meshed=False)])
    assert load_sidecar_ports(str(path)) == {("default", "account", "account-0"): 16006}
    child = control_child(tmp_path / "mesh.yaml", "127.0.0.1", 15010, None, path)
    assert child.argv[-2:] == ["--sidecar-ports", str(path)]
