"""Adversarial cases, one module per attack surface: each asserts the answer, that nothing
reached a target, and that the gateway still serves a valid request afterwards."""
