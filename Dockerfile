# One image for every meshproxy command: in the cluster it runs the control plane and the
# webhook (deploy/), and in each injected pod `meshproxy init` and the proxy.
#   docker build -t ghcr.io/meshproxy/meshproxy:0.1.0 .
FROM python:3.11-slim

# `meshproxy init` (the injected init container, root with NET_ADMIN/NET_RAW) drives
# iptables-save/-restore and ip6tables; everything else needs nothing beyond Python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY meshproxy ./meshproxy
# The kubernetes extra: discovery, TokenReview and namespace reads from the API server. The
# request path is compiled with mypyc (setup.py), which needs a C compiler for the build only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir '.[kubernetes]' \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && cd / && rm -rf /src
WORKDIR /

# The proxy's UID (spec §2): the iptables rules let its own traffic out unredirected.
RUN groupadd --system --gid 1337 meshproxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin meshproxy
USER 1337
ENTRYPOINT ["meshproxy"]
CMD ["--help"]
