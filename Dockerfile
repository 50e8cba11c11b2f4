# felix-lite node image: the agent (`felix-lite agent`), the ExaBGP sidecar
# (`felix-lite bgp sidecar`, exabgp comes as a dependency), the install-cni init
# container (`python -m felix_lite.cni.install`) and the CNI plugin itself.
#
# The CNI plugin runs on the host, started by the container runtime, so install-cni
# copies this image's Python prefix (/usr/local, felix-lite installed into it) to
# the host's /var/lib/felix-lite/cni-runtime and puts a launcher for it in
# /opt/cni/bin. That is why felix-lite is installed into the system prefix here,
# not into a venv, and not editable.
FROM python:3.11-slim-bookworm

# iptables: both backends (iptables-legacy-* and iptables-nft-*; the agent detects
# which one the node uses). ipset, iproute2, conntrack: the dataplane's tools.
# containernetworking-plugins: portmap/bandwidth in /usr/lib/cni, copied to hosts
# that lack them when chaining is enabled.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        iptables ipset iproute2 conntrack containernetworking-plugins \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY policy ./policy
COPY controller ./controller
COPY felix_lite ./felix_lite
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src \
    && felix-lite --version \
    && python -c "import felix_lite.cni.plugin, felix_lite.cni.install, exabgp"
WORKDIR /

LABEL org.opencontainers.image.title="felix-lite" \
      org.opencontainers.image.description="Calico-style pure-L3 Kubernetes networking: agent, ExaBGP sidecar, CNI plugin" \
      org.opencontainers.image.licenses="Apache-2.0"

# The chart sets each container's command; this default is the agent.
CMD ["felix-lite", "agent", "--config", "/etc/felix-lite/config.yaml"]
