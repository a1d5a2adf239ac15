"""The HTTP/2 codec (meshproxy/http2/codec.py) against a real client: curl with
`--http2-prior-knowledge` talks to a small server made of the codec and a socket, on
127.0.0.1. The server answers each request with its path and the size and SHA-256 of the
body it received, crediting received bytes only once it has taken them (the flow control
the proxy will use), so an upload larger than every window still arrives whole."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading

import pytest

from meshproxy.http2.codec import Codec, ConnectionFailed, Data, Headers, Settings
from meshproxy.http2.fields import request_head


class _Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.codec = Codec(server=True, settings=Settings(initial_window_size=65535,
                                                          connection_window_size=65535))
        self.bodies: dict[int, hashlib._Hash] = {}
        self.sizes: dict[int, int] = {}
        self.paths: dict[int, bytes] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.codec.start()
        self.transport.write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive(data)
        except ConnectionFailed:
            self.transport.write(self.codec.failure_bytes())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, Headers) and not event.trailers:
                head = request_head(event.fields)
                self.paths[event.stream_id] = head.target
                self.bodies[event.stream_id] = hashlib.sha256()
                self.sizes[event.stream_id] = 0
                if event.end_stream:
                    self._answer(event.stream_id)
            elif isinstance(event, Data):
                self.bodies[event.stream_id].update(event.data)
                self.sizes[event.stream_id] += len(event.data)
                self.codec.consumed(event.stream_id, len(event.data))
                if event.end_stream:
                    self._answer(event.stream_id)
        self.transport.write(self.codec.data_to_send())

    def _answer(self, stream_id: int) -> None:
        body = json.dumps({"path": self.paths[stream_id].decode(), "bytes": self.sizes[stream_id],
                           "sha256": self.bodies[stream_id].hexdigest()}).encode()
        self.codec.send_headers(stream_id, [(b":status", b"200"),
                                            (b"content-type", b"application/json"),
                                            (b"content-length", b"%d" % len(body))])
        self.codec.send_data(stream_id, body, end_stream=True)


@pytest.fixture
def server_port():
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(loop.create_server(_Server, "127.0.0.1", 0))
        holder["port"] = server.sockets[0].getsockname()[1]
        holder["server"] = server
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield holder["port"]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def curl(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20",
                           "-w", "\n%{http_version}", *args, f"http://127.0.0.1:{port}/echo"],
                          capture_output=True, timeout=30)


def test_curl_gets_an_answer_over_http2(server_port) -> None:
    done = curl(server_port)
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert json.loads(body) == {"path": "/echo", "bytes": 0,
                                "sha256": hashlib.sha256(b"").hexdigest()}


def test_an_upload_larger_than_every_window_arrives_whole(server_port, tmp_path) -> None:
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB, 64 times the windows
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    done = curl(server_port, "--data-binary", f"@{upload}")
    assert done.returncode == 0, done.stderr
    body, version = done.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert json.loads(body) == {"path": "/echo", "bytes": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}
