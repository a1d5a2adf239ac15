"""meshproxy: a service mesh whose sidecar and control plane fit in one readable package."""

__version__ = "0.1.0"

# Before any module is imported: load the .py source instead of the compiled modules when
# MESHPROXY_PURE=1 is set or the compiled build is stale (meshproxy/_loading.py). This file
# is never compiled.
from meshproxy import _loading

_loading.choose()
