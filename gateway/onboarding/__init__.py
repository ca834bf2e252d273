"""Onboarding: getting a deployment ready for Meta (checks, handshake, Graph API, test traffic).

Rule: nothing here imports :mod:`gateway.runtime`; these tools talk to a gateway over the
network, as Meta and an operator do.
"""
