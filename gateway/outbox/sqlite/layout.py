"""The outbox file's layout: its tables and indexes, and opening a file with them.

Rule: a file is opened with the durability settings the outbox promises (WAL, ``synchronous=
FULL``) and with exactly this layout; a new file is given it, a file of any other layout is
refused before anything in it changes. The layout is recorded in ``PRAGMA user_version``.

Layout 3 added the ``attempts`` table (each attempt's outcome, for the admin console). A file
of layout 2 is migrated when it is opened: the table is created and the version raised in one
transaction, nothing else in the file changes, and its deliveries simply have no attempt history
from before.

Layout 4 added each delivery's conversation (``order_key``, for targets with ``order =
"conversation"``) and its place in that order when it was replayed (``position``; otherwise
its id is its place). A file of layout 2 or 3 is migrated when it is opened, in one
transaction: its deliveries have no conversation, and go out in no particular order, as before.

Layout 5 added each notification's trace context (``trace``, see :mod:`gateway.tracing`), so
an attempt made after a restart joins the trace of the request that brought it. A file of
layout 2, 3 or 4 is migrated when it is opened, in one transaction: its notifications have no
trace context (their attempts start traces of their own).

Layout 6 added the seconds each delivery spent held by its target's pacing (``held_s``: waiting,
due, for a token of the rate limit or behind an earlier delivery of its conversation), which its
age for ``max_age_s`` leaves out. A file of layout 2 to 5 is migrated when it is opened, in one
transaction: its deliveries have held for no time so far.

Layout 7 indexes each keyed pending delivery by its place in its conversation itself
(``COALESCE(position, id)``, an index on that expression) where layout 4 to 6 indexed
``position`` alone: "the first pending delivery of each conversation" and "the run behind it"
are then ranges of the index read in order, where the old index made SQLite sort each
conversation's entries in a temporary b-tree at every claim. A file of layout 2 to 6 is migrated
when it is opened, in one transaction: the old index is dropped and the new one built from the
rows (one pass over the pending ones); no row changes.

Layout 8 has no index of conversations at all: the one dispatcher of a file holds each ordered
target's conversations in memory (:mod:`gateway.outbox.sqlite.lineup`), and every delivery that
ended had to be taken out of the index at a page of its own (its conversation's), which made an
ordered drain write a page of the log per delivery where a drain without order writes a fifth of
one (``bench/README.md``, "Issue 22"). A file of layout 2 to 7 is migrated when it is opened, in
one transaction: the index is dropped; no row changes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path

from gateway.errors import OutboxError
from gateway.outbox.sqlite import sidecars

__all__ = ["connect", "describe", "open_store", "read_prefix"]

# PRAGMA user_version of the layout below. Layout 1 had random TEXT delivery ids and left
# user_version at 0; layout 2 had no attempts table.
_LAYOUT = 8
# Write-ahead log pages that trigger a checkpoint (see open_store).
_CHECKPOINT_PAGES = 200
_OLDER_LAYOUT = (
    "made by an older version of the outbox (random text delivery ids); deliver or export its"
    " pending deliveries with the previous version of waba-gateway, or move the file away"
    " (with its -wal and -shm files) to start a new outbox"
)

# Layout 3's addition. No foreign key: attempts are removed with their delivery by pruning, and
# a check on every insert would cost a lookup in the deliveries table for nothing.
_ATTEMPTS = (
    """CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    number INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    response TEXT NOT NULL
)""",
    "CREATE INDEX attempts_delivery ON attempts (delivery_id)",
)

# Layout 4's addition: each delivery's conversation, and the place a replay gave it.
_ORDER = (
    "ALTER TABLE deliveries ADD COLUMN order_key TEXT",
    "ALTER TABLE deliveries ADD COLUMN position INTEGER",
)

# The indexes of conversations layouts 4 to 6 (on `position`) and 7 (on each keyed pending
# delivery's place in its conversation) had: dropped by the migration to layout 8.
_OLD_ORDER_INDEXES = (
    "DROP INDEX IF EXISTS deliveries_order",
    "DROP INDEX IF EXISTS deliveries_place",
)

# Layout 5's addition: a nullable column, so no row is rewritten.
_TRACE = ("ALTER TABLE notifications ADD COLUMN trace TEXT",)

# Layout 6's addition: a column with a constant default, so no row is rewritten either.
_HELD = ("ALTER TABLE deliveries ADD COLUMN held_s REAL NOT NULL DEFAULT 0",)

# Statements one by one rather than a script: executescript() commits first, and the layout is
# created inside the transaction that checked the file was empty.
_SCHEMA = (
    # One row: the prefix of this file's delivery ids.
    "CREATE TABLE meta (delivery_id_prefix TEXT NOT NULL)",
    # No index on received_at: pruning walks rows in id order, which is time order.
    """CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    received_at REAL NOT NULL,
    signature TEXT NOT NULL,
    body BLOB NOT NULL
)""",
    "CREATE INDEX notifications_digest ON notifications (digest, received_at)",
    # An integer key is the table's own b-tree key: a random text key needed a second, unique
    # index written at every insert and searched at every update.
    """CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notification_id INTEGER NOT NULL REFERENCES notifications (id),
    target TEXT NOT NULL,
    body BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    last_response TEXT
)""",
    # Claims read each target's due deliveries in time order; pruning finds old delivered rows.
    "CREATE INDEX deliveries_due ON deliveries (state, target, next_attempt_at)",
    # Pruning asks "does this notification still have deliveries?" (and so does the foreign
    # key when a notification is deleted): without this index, a scan of every delivery.
    "CREATE INDEX deliveries_notification ON deliveries (notification_id)",
    *_ATTEMPTS,
    *_ORDER,
    *_TRACE,
    *_HELD,
)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _create(conn: sqlite3.Connection, path: Path) -> None:
    """Give an empty file the current layout; refuse a file that holds anything else."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "deliveries" in tables:
        raise OutboxError(f"outbox.path = '{path}': {_OLDER_LAYOUT}")
    if tables:
        raise OutboxError(
            f"outbox.path = '{path}': not an outbox (it holds tables {', '.join(sorted(tables))});"
            " point outbox.path at a new file"
        )
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (delivery_id_prefix) VALUES (?)", (secrets.token_hex(8),))
    conn.execute(f"PRAGMA user_version = {_LAYOUT}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a file of layout 2 to 7 to layout 8: the attempts table (from 2), the columns
    of ordered delivery (from 2 or 3), the trace context (from 2 to 4), the held time (from 2
    to 5), no index of conversations (from 4 to 7); nothing else."""
    version = _user_version(conn)
    if version == 2:
        for statement in _ATTEMPTS:
            conn.execute(statement)
    if version in (2, 3):
        for statement in _ORDER:
            conn.execute(statement)
    if version in (2, 3, 4):
        for statement in _TRACE:
            conn.execute(statement)
    if version in (2, 3, 4, 5):
        for statement in _HELD:
            conn.execute(statement)
    for statement in _OLD_ORDER_INDEXES:
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {_LAYOUT}")


def _under_write_lock(
    conn: sqlite3.Connection, path: Path, version: int, change: Callable[..., None]
) -> None:
    """Run ``change`` in one transaction if the file is still at ``version`` once locked."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _user_version(conn) == version:  # again, under the write lock: another opener may win
            change(conn, path)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _layout(conn: sqlite3.Connection, path: Path) -> str:
    """Check the file's layout (creating it in a new file, migrating layouts 2 to 7); return its
    delivery id prefix."""
    if _user_version(conn) == 0:
        _under_write_lock(conn, path, 0, _create)
    for older in (2, 3, 4, 5, 6, 7):
        if _user_version(conn) == older:
            _under_write_lock(conn, path, older, _migrate)
    version = _user_version(conn)
    if version != _LAYOUT:
        raise OutboxError(
            f"outbox.path = '{path}': made by another version of the outbox (layout {version},"
            f" this version reads layout {_LAYOUT}); run the version that made it, or move the"
            " file away (with its -wal and -shm files) to start a new outbox"
        )
    return read_prefix(conn)


def read_prefix(conn: sqlite3.Connection) -> str:
    """The prefix of the delivery ids of the file ``conn`` is open on."""
    row = conn.execute("SELECT delivery_id_prefix FROM meta").fetchone()
    if row is None:
        raise OutboxError("outbox has no delivery id prefix (its meta table is empty)")
    return str(row[0])


def _damage(conn: sqlite3.Connection) -> str | None:
    """What SQLite's structural check finds wrong with the file (the first problem, and how
    many); ``None`` when nothing. Reads every page: a damaged page is reported at start,
    not found later by a request that then fails, or by a delivery that is silently lost."""
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(20)")]
    except sqlite3.DatabaseError as exc:  # damage SQLite meets before the check can run
        return str(exc)
    if problems == ["ok"]:
        return None
    # SQLite heads its first line with "*** in database main ***" and a line break: one line.
    first = " ".join(line for line in problems[0].splitlines() if not line.startswith("***"))
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first}{more}"


def _damaged_message(path: Path, problem: str) -> str:
    """The one-line refusal of a damaged file, with the ways out (see the README, "Faults")."""
    return (
        f"outbox.path = '{path}' is damaged: {problem}; move it aside (with its -wal and -shm"
        " files) to start a new outbox, or recover what it holds with"
        f" `sqlite3 '{path}' .recover | sqlite3 recovered.sqlite3` and point outbox.path there"
    )


def _null(value: None) -> None:
    return value


# sqlite3 binds int, float, str and bytearray as they are, but first "adapts" a bytes or a None
# parameter: it finds no adapter registered, looks for ``__adapt__`` on its protocol class and
# formats the AttributeError that lookup raises, about 1,500 instructions a parameter, and
# every notification binds several (its digest twice, its body, an absent trace or conversation
# key). Registered adapters that return the value itself bind exactly the same thing without
# the error. Process-wide, as sqlite3's registry is; neither changes what any statement stores.
sqlite3.register_adapter(bytes, bytes)
sqlite3.register_adapter(type(None), _null)


def open_store(path: Path, busy_timeout_s: float = 5.0) -> tuple[sqlite3.Connection, str]:
    """Open ``path`` with the durability settings the outbox promises, giving a new file the
    current layout; ``(connection, delivery id prefix)``. Another layout raises OutboxError.
    A statement waits up to ``busy_timeout_s`` for a lock another process holds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
    except (OSError, sqlite3.Error) as exc:
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    try:
        # FULL: the WAL is synced at every commit, so a committed notification survives power
        # loss; NORMAL would only survive a process crash.
        problem = _damage(conn)
        if problem is not None:
            raise OutboxError(_damaged_message(path, problem))
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # The layout first: a file that is refused is not even switched to WAL.
        prefix = _layout(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        # The commit that takes the log past this many pages copies them into the database
        # file and syncs it before its requests are answered (https://sqlite.org/wal.html,
        # "Automatic Checkpoint"). SQLite's 1000 pages made that a stall long enough to set the
        # 99th percentile of acknowledgements; 200 makes each stall a fifth as long for the
        # same CPU in all.
        conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
    except sqlite3.Error as exc:
        conn.close()
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, prefix


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` with the durability settings the outbox promises, giving a new file the
    current layout; a file of another layout raises OutboxError."""
    return open_store(path)[0]


def describe(path: Path) -> str:
    """What ``waba-gateway check`` says about the outbox file, which it opens read-only and
    leaves as it is: whether it exists (or can be made), its layout, SQLite's structural check
    and its deliveries by state. Raises OutboxError for what ``serve`` would refuse."""
    # Read-only, SQLite still makes a -wal and -shm beside a WAL file to read it, and cannot
    # remove them: whoever runs `check` would own them (see sidecars).
    with sidecars.as_found(path):
        return _describe(path)


def _describe(path: Path) -> str:
    where = f"outbox file {path}"
    if not path.exists():
        folder = next(parent for parent in path.parents if parent.exists())
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutboxError(
                f"outbox.path = '{path}': does not exist, and {folder} is not writable to make it"
            )
        return f"{where} does not exist yet: the first start makes it"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    try:
        problem = _damage(conn)
        if problem is not None:
            raise OutboxError(_damaged_message(path, problem))
        version = _user_version(conn)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if version == 0 and not tables:
            return f"{where} is empty: the first start gives it the outbox's layout"
        if version == 0 and "deliveries" in tables:
            raise OutboxError(f"outbox.path = '{path}': {_OLDER_LAYOUT}")
        if version not in (2, 3, 4, 5, 6, _LAYOUT) or "deliveries" not in tables:
            raise OutboxError(
                f"outbox.path = '{path}': not an outbox of this version (layout {version})"
            )
        counts = dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"))
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox.path = '{path}': cannot read: {exc}") from exc
    finally:
        conn.close()
    states = ", ".join(f"{counts.get(state, 0)} {state}" for state in ("pending", "dead"))
    migrate = f"; the next start brings it to layout {_LAYOUT}" if version != _LAYOUT else ""
    return f"{where}: layout {version}, intact (quick_check), {states}{migrate}"
