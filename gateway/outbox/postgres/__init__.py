"""The PostgreSQL outbox: one database shared by several gateways (the ``postgres`` extra)."""
