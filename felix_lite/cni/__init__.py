"""felix-lite's CNI plugin (`felix-lite-cni`) with its built-in IPAM.

`plugin` is the executable's entry point (CNI spec 1.0/1.1 protocol),
`netconf` parses the environment and stdin and shapes results and errors,
`ipam` allocates pod addresses from the node's pod CIDR on disk, and `wiring`
builds the veth pair, addresses and routes with pyroute2. The agent calls
`wiring.ensure_blackhole` for the node's own pod CIDR. See docs/cni.md.
"""
