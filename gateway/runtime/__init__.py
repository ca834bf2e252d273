"""The runtime: wiring the parts into a running gateway, its processes, admin listener and stats."""
