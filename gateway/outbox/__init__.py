"""The outbox: every acknowledged notification, kept until it is delivered.

Rule: the rest of the gateway talks to the outbox through the interface and data types of this
package alone; the storage engine (``sqlite/``) is behind it.
"""
