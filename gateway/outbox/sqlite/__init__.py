"""The SQLite outbox: one file in WAL mode, written by one group-committing thread."""
