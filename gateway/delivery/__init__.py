"""Delivery: sending what the outbox holds to the targets, outside the request path.

The dispatcher schedules, the forwarder and upstream client send, ``outcome`` classifies each
attempt (the one place that does), ``backoff`` decides when to try again, ``target_tls``
builds the TLS context of a target with a CA or client certificate of its own.
"""
