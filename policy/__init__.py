"""Pure NetworkPolicy logic: model, parsing, validation, selectors, compiler.

No I/O here (no kubernetes, pyroute2, iptc, subprocess, socket or time): the
controller feeds it cluster state and felix_lite programs what it returns.
"""
