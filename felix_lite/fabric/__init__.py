"""The pure L3 fabric: the node agent's routing half and the multi-node lab around it.

- `node`: `NodeRouting` -- local pods out over BGP (ExaBGP sidecar via `Speaker`),
  pod /32s and the node block's blackhole (`LocalPodRoutes`), learned routes into
  the kernel (`LearnedRoutes`), reconcile after in-sync, peer status.
- `routers`: real ToR routers in a namespace (BIRD 2, FRR 8.4, GoBGP 3).
- `topology`: `FabricLab`, N nodes + ToR (or a node-to-node mesh), pods via the CNI.
- `sidecar`: `felix-lite bgp sidecar|render` (the chart's exabgp container).

See docs/fabric.md.
"""

from felix_lite.fabric.node import NodeRouting, PeerRoutingStatus, RoutingStatus

__all__ = ["NodeRouting", "PeerRoutingStatus", "RoutingStatus"]
