"""BGP through an ExaBGP sidecar.

ExaBGP runs as its own process (the `exabgp` container in the chart, a child
process in tests and the lab). Its API process is `felix_lite.bgp.bridge`, a
thin relay between ExaBGP's stdin/stdout and a unix socket served by the agent's
`felix_lite.bgp.speaker.Speaker`. The pure parts -- configuration rendering
(`config`), command rendering (`commands`) and JSON parsing plus the import
filter (`messages`) -- are golden-tested without ExaBGP. See docs/bgp.md.
"""
