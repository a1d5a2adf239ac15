"""The Dockerfile's recipe, carried out step by step without a container engine.

There is no Docker engine on these machines and no registry to pull `python:3.11-slim`
from, so the image itself cannot be built here. What can be checked is everything the
Dockerfile asks for: its instructions are read with the `dockerfile` package (Docker's own
parser) and carried out, in order, in a root file system that stands in for the base image:

- FROM `python:3.11-*`: Debian bookworm (the release that image is built on) made with
  `debootstrap`, with Python 3.11 and a virtual environment at /usr/local, so that `python3`
  and `pip` are first on PATH as they are in the official image;
- RUN: `/bin/sh -c` in a chroot, in the current WORKDIR (made when missing, as the container
  runtime does), as root (the build's user);
- COPY: from the build context (the repository), relative to WORKDIR;
- WORKDIR, USER, ENTRYPOINT, CMD: recorded, and used to run the finished image.

The build reaches Debian's and PyPI's registries through this machine's resolver and trust
store, which are copied in, as `docker build` would use the host's network. Then the "image"
is run the way the cluster runs it (deploy/): the default command as its USER, `meshproxy
init --dry-run` as root (the init container), and the control plane as its USER until it
answers /ready.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
pytestmark = [pytest.mark.timeout(900)]


@dataclass
class Image:
    """A root file system and what the Dockerfile said about running it."""

    root: Path
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def run(self, argv: list[str], *, user: str | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `argv` inside the root as `user` (the image's USER by default)."""
        who = user or self.user
        spec = [] if who == "root" else [f"--userspec={who}:{who}"]
        done = subprocess.run(["chroot", *spec, str(self.root), "/usr/bin/env", "-i",
                               *(f"{k}={v}" for k, v in self.env.items()), *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done


def _sh(*argv: str, timeout: float = 600) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-4000:]}")


def _build_environment() -> dict[str, str]:
    """What RUN steps see: the official image's PATH and locale, and this machine's package
    index settings (a mirror, a proxy or a certificate bundle), but no local wheel folder,
    which does not exist inside the root."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
    for name, value in os.environ.items():
        if (name.startswith("PIP_") and name != "PIP_FIND_LINKS") or name.lower() in (
                "http_proxy", "https_proxy", "no_proxy"):
            env[name] = value
    return env


def _base_image(root: Path, base: str) -> None:
    """The stand-in for `base` (see the module docstring)."""
    assert base.startswith("python:3.11"), f"the recipe stands in for python:3.11 only, not {base}"
    # python3-dev: the official image ships Python's headers (the compiled build needs them).
    _sh("debootstrap", "--variant=minbase",
        "--include=python3,python3-venv,python3-dev,ca-certificates",
        SUITE, str(root), "http://deb.debian.org/debian")
    for host_file in ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt"):
        target = root / host_file.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_file, target)
    if bundle := os.environ.get("PIP_CERT"):
        target = root / bundle.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, target)
    _sh("chroot", str(root), "/usr/bin/python3", "-m", "venv", "/usr/local")


def _copy(image: Image, sources: tuple[str, ...], dest: str) -> None:
    """COPY: files and folders of the build context, to a folder or a file name."""
    target = Path(dest if dest.startswith("/") else f"{image.workdir.rstrip('/')}/{dest}")
    into_folder = dest.endswith("/") or len(sources) > 1
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the build context"
        where = image.root / target.relative_to("/")
        if into_folder:
            where.mkdir(parents=True, exist_ok=True)
            where = where / path.name
        where.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, where, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(path, where)


def build(root: Path) -> Image:
    """Carry out the Dockerfile in `root`; return the image. Raises AssertionError on a step
    that fails or an instruction this recipe does not know."""
    image = Image(root, env=_build_environment())
    proc = root / "proc"
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        step = f"Dockerfile:{command.start_line}: {command.original}"
        if command.cmd == "FROM":
            _base_image(root, command.value[0])
        elif command.cmd == "WORKDIR":
            image.workdir = command.value[0]
            (root / image.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif command.cmd == "COPY":
            _copy(image, command.value[:-1], command.value[-1])
        elif command.cmd == "RUN":
            shell = command.value[0] if not command.json else shlex.join(command.value)
            (root / image.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            _sh("mount", "-t", "proc", "proc", str(proc))
            try:
                done = image.run(["/bin/sh", "-c", f"cd {shlex.quote(image.workdir)} && {shell}"],
                                 user="root", timeout=600, check=False)
            finally:
                _sh("umount", str(proc))
            assert done.returncode == 0, f"{step}\nexited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        elif command.cmd == "USER":
            image.user = command.value[0]
        elif command.cmd == "ENTRYPOINT":
            image.entrypoint = list(command.value)
        elif command.cmd == "CMD":
            image.cmd = list(command.value)
        else:
            raise AssertionError(f"{step}: an instruction this recipe does not carry out")
    # what the image runs with: the official image's environment, nothing from the build
    image.env = {"PATH": image.env["PATH"], "LANG": "C.UTF-8"}
    return image


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    root = Path(tempfile.mkdtemp(prefix="mp-image-"))
    try:
        built = build(root / "rootfs")
        # a container has /proc (`meshproxy init` reads it to see whether the pod has IPv6)
        _sh("mount", "-t", "proc", "proc", str(built.root / "proc"))
        yield built
    finally:
        if (root / "rootfs" / "proc").is_mount():
            subprocess.run(["umount", "-l", str(root / "rootfs" / "proc")], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_the_default_command_runs_as_the_proxy_uid(image: Image) -> None:
    assert image.user == "1337"
    done = image.run([*image.entrypoint, *image.cmd])
    assert "usage: meshproxy" in done.stdout
    for command in ("proxy", "control", "webhook", "init", "inject"):
        assert command in done.stdout
    whoami = image.run(["/usr/bin/id", "-u"])
    assert whoami.stdout.strip() == "1337"
    # the source tree is gone and the package is installed, not run from a checkout
    assert not (image.root / "src").exists()
    where = image.run(["python3", "-c", "import meshproxy; print(meshproxy.__file__)"])
    assert where.stdout.startswith("/usr/local/lib/python3.11/site-packages/meshproxy/")


def test_the_image_runs_the_compiled_request_path(image: Image) -> None:
    # the build's C compiler is gone again, and the request path is compiled
    assert not (image.root / "usr/bin/gcc").exists()
    version = image.run([*image.entrypoint, "--version"])
    assert "compiled with mypyc" in version.stdout, version.stdout


def test_the_init_container_can_print_its_rules(image: Image) -> None:
    """deploy/ runs `meshproxy init` as root with NET_ADMIN: the image must have iptables."""
    done = image.run([*image.entrypoint, "init", "--dry-run"], user="root")
    assert "-A MESHPROXY_OUTPUT" in done.stdout and "ip6tables-restore" in done.stdout
    version = image.run(["iptables-restore", "--version"], user="root")
    assert "iptables" in version.stdout


def test_a_classic_sidecars_hooks_run_in_the_image(image: Image) -> None:
    """Injection gives a classic proxy container `meshproxy wait-ready` (postStart) and
    `sleep N` (preStop): both must exist for its user."""
    done = image.run([*image.entrypoint, "wait-ready", "--timeout", "0.2"], check=False)
    assert done.returncode == 1 and "was not ready within 0.2s" in done.stderr
    assert image.run(["sleep", "0"]).returncode == 0


def test_the_kubernetes_extra_is_installed(image: Image) -> None:
    done = image.run(["python3", "-c", "import kubernetes_asyncio, meshproxy.control.kubernetes, "
                      "meshproxy.kube.webhook, meshproxy.kube.bootstrap; print('ok')"])
    assert done.stdout.strip() == "ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_control_plane_serves_from_the_image(image: Image) -> None:
    config = image.root / "etc" / "meshproxy"
    shutil.copytree(REPO / "config" / "demo", config)
    for path in (config, *config.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = _free_port()
    argv = [*image.entrypoint, "control", "--config", "/etc/meshproxy", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(["chroot", f"--userspec={image.user}:{image.user}", str(image.root),
                             "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in image.env.items()), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    body = json.load(r)
                break
            except OSError:
                assert time.monotonic() < deadline, "the control plane did not answer in 30 s"
                time.sleep(0.1)
        assert body["version"] and not body.get("lastError")
    finally:
        proc.terminate()
        proc.wait(10)
