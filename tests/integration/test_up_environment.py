"""What `meshproxy up`'s children see of the shell's environment: its MESHPROXY_* variables are
the defaults of `meshproxy proxy`'s flags, so they must not reach the sidecars `up` starts
(MESHPROXY_SERVICE_ACCOUNT from a shell would make every sidecar refuse its certificate)."""

from __future__ import annotations

import sys

from meshproxy.local.supervisor import Child, Supervisor


async def test_children_get_only_the_meshproxy_variables_up_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPROXY_SERVICE_ACCOUNT", "from-the-shell")
    monkeypatch.setenv("MESHPROXY_TRANSPARENT", "true")
    monkeypatch.setenv("UNRELATED_SETTING", "kept")
    supervisor = Supervisor(tmp_path / "logs", out=open(tmp_path / "out", "w"))
    child = Child("probe", [sys.executable, "-c",
                            "import os; print(sorted((k, v) for k, v in os.environ.items() "
                            "if k.startswith('MESHPROXY_') or k == 'UNRELATED_SETTING'))"],
                  env={"MESHPROXY_SERVICE": "web"})
    await supervisor.start(child)
    assert await child.process.wait() == 0
    await child._pump
    printed = child.log_path.read_text()
    assert "[('MESHPROXY_SERVICE', 'web'), ('UNRELATED_SETTING', 'kept')]" in printed, printed
