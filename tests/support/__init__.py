"""Helpers shared by the integration tests: real backends, a proxy process, raw HTTP/1.1.

- `backend.HttpBackend`: an aiohttp app in a background thread that records what it receives.
- `rawbackend.RawBackend`: a TCP server that records raw bytes and answers as it is told.
- `proxy.ProxyProcess` / `proxy.mesh_yaml`: a `meshproxy proxy` subprocess on free ports.
- `rawhttp`: blocking sockets, request bytes and a response reader that shows the wire.
- `faults.FaultyBackend` / `faults.KeepAliveCloser`: backends that fail, stall or close
  keep-alive connections on purpose (the resilience tests).
"""
