"""HTTP/2, sans I/O: the codec the proxy drives (codec.py) and the header fields between
HTTP/1.1 heads and HTTP/2 header lists (fields.py)."""
