"""meshproxy: a service mesh whose sidecar and control plane fit in one readable package."""

__version__ = "0.1.0"
