"""The node agent's I/O shell: kernel dataplane, routes, BGP bridge, CNI, lab, CLI."""

__version__ = "0.1.0"
