"""Reloading the configuration without a restart: what a reload may change.

Rule: a reload builds a whole new configuration and TLS context first and swaps them in only if
both succeed; a reload that fails changes nothing (the running gateway keeps serving with what it
had). Which changed keys take a restart (:func:`restart_only`) and the configuration a reload
applies (:func:`applicable`), which keeps those keys as they were, are pure decisions.

Swapped at once: the server certificate and key, the client CA bundle and the CRL's contents
(new handshakes), ``tls.client_cn``, ``tls.watch_*``, verify tokens and app secrets (new requests),
targets and their settings (each target's CA and client certificate files are read again, even
under unchanged names), the dispatcher's settings, the admin token and ``admin.allowed_hosts``.
``listen.proxy_protocol`` is part of ``[listen]``: a restart. Bound when the process
started, so changed only by a restart: the listener (``[listen]``), the outbox, where the admin
listener listens, logging, and what OpenSSL copies into each connection from the listening
context (``tls.client_auth``, ``tls.session_tickets``, whether a CRL is checked at all).

What a reload read is written down as each file's SHA-256 (:func:`read_files`): the
configuration file and every file it names that a reload reads. A reload whose files differ
after it built everything from them read a file still being written, and changes nothing.

In a gateway of several workers, worker 0 alone decides what to take: it writes down the files
it took (:class:`Asked`, in the folder the workers share) and asks the supervisor to reload the
others; each of them takes the same files only if it reads the same content, and writes down its
:class:`Answer`. So a file changed between two workers' reads cannot leave them serving
different configurations unseen: the worker that reads other content refuses it, and worker 0
reads the files again (:meth:`gateway.runtime.gateway.Gateway.reload`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config import MIN_ADMIN_TOKEN_CHARS, Config
from gateway.config.rules import admin_exposure
from gateway.errors import ConfigError

__all__ = [
    "Answer",
    "Asked",
    "Files",
    "answer",
    "answers",
    "applicable",
    "ask",
    "asked",
    "first_difference",
    "named_files",
    "read_files",
    "restart_only",
]

# What a file that cannot be read is written down as, in place of its digest.
UNREADABLE = "unreadable"

# Each file as a path and what it held: its SHA-256 in hex, or UNREADABLE.
Files = tuple[tuple[str, str], ...]


def _restart_only_values(config: Config) -> dict[str, object]:
    tls, admin = config.tls, config.admin
    return {
        "listen": config.listen,
        "outbox": config.outbox,
        "admin.enabled": admin.enabled,
        "admin.host": admin.host,
        "admin.port": admin.port,
        "log.level": config.log_level,
        "log.format": config.log_format,
        # The exporter and its provider are made once per process (gateway.tracing.export).
        "tracing": config.tracing,
        "tls.client_auth": tls.client_auth,
        "tls.session_tickets": tls.session_tickets,
        "tls.crl_file": tls.crl_file is not None,  # its contents reload; turning it on or off not
    }


def restart_only(old: Config, new: Config) -> list[str]:
    """The keys (or tables) that differ between ``old`` and ``new`` and take a restart."""
    before, after = _restart_only_values(old), _restart_only_values(new)
    return [key for key in before if before[key] != after[key]]


def applicable(old: Config, new: Config) -> Config:
    """``new`` with every restart-only value kept as in ``old``: the configuration in force
    after the reload, so that what the gateway reports is what it does. Raises ConfigError
    when that configuration would leave the admin listener on the network without a token
    strong enough for it (the rule a loaded file is held to)."""
    tls = dataclasses.replace(
        new.tls, client_auth=old.tls.client_auth, session_tickets=old.tls.session_tickets
    )
    if (old.tls.crl_file is None) != (new.tls.crl_file is None):
        tls = dataclasses.replace(tls, crl_file=old.tls.crl_file)
    admin = dataclasses.replace(
        new.admin, enabled=old.admin.enabled, host=old.admin.host, port=old.admin.port
    )
    # The new file's own [admin] passed its checks, but its listener stays where the old one
    # listens: a file that moves it to loopback and drops the token would otherwise leave
    # the API open on the network until a restart.
    exposed = admin_exposure(admin.enabled, admin.host, admin.token, MIN_ADMIN_TOKEN_CHARS)
    if exposed is not None:
        key, expected = exposed
        raise ConfigError(
            f"{new.source or 'the configuration'}: {key}: the admin listener stays on"
            f" {admin.host!r} until a restart, so it needs {expected}"
        )
    return dataclasses.replace(
        new,
        listen=old.listen,
        outbox=old.outbox,
        admin=admin,
        tls=tls,
        log_level=old.log_level,
        log_format=old.log_format,
        tracing=old.tracing,
    )


def named_files(source: Path, config: Config) -> list[Path]:
    """The configuration file ``source`` and every file of ``config`` a reload reads: the
    listener's certificate, key, client CA bundle and CRL, and each target's CA bundle,
    certificate and key."""
    tls = config.tls
    paths: list[Path | None] = [source, tls.cert_file, tls.key_file, tls.client_ca_file]
    paths.append(tls.crl_file)
    for target in config.targets:
        paths += [target.ca_file, target.cert_file, target.key_file]
    return [path for path in paths if path is not None]


def read_files(paths: Sequence[Path]) -> Files:
    """Each file of ``paths`` as read now, through any links."""
    read = []
    for path in paths:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except (OSError, ValueError):  # ValueError: a NUL in the path; building says why
            digest = UNREADABLE
        read.append((str(path), digest))
    return tuple(read)


def first_difference(before: Files, after: Files) -> str | None:
    """The path of the first file read differently in ``after`` than in ``before`` (the
    first of ``after`` when they name different files); None when they are the same."""
    if before == after:
        return None
    for (path, digest), (_, earlier) in zip(after, before, strict=False):
        if digest != earlier:
            return path
    return after[0][0] if after else None


# -- what the workers of one gateway write down for each other ------------------------------

_ASKED = "reload-asked.json"
_ANSWER = "reload-answer-{pid}.json"


@dataclass(frozen=True, slots=True)
class Asked:
    """Worker 0's request to the others: take these ``files`` (``ask_id`` names the request)."""

    ask_id: str
    files: Files


@dataclass(frozen=True, slots=True)
class Answer:
    """A worker's answer to request ``ask_id``: ``ok`` (it took the files), or the one-line
    ``message`` saying why not; ``changed``: it read other content than worker 0 took."""

    ask_id: str
    ok: bool
    changed: bool
    message: str


def _write(path: Path, value: object) -> None:
    """Write ``value`` as JSON in one step for its readers (a new file renamed over)."""
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(json.dumps(value), encoding="utf-8")
    os.replace(part, path)


def _read(path: Path) -> dict[str, object] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def ask(folder: Path, request: Asked) -> None:
    """Write down worker 0's request in the workers' shared ``folder``."""
    _write(folder / _ASKED, {"ask_id": request.ask_id, "files": request.files})


def asked(folder: Path) -> Asked | None:
    """Worker 0's latest request, if any."""
    value = _read(folder / _ASKED)
    if value is None:
        return None
    files = value.get("files")
    ask_id = value.get("ask_id")
    if not isinstance(ask_id, str) or not isinstance(files, list):
        return None
    return Asked(ask_id, tuple((str(path), str(digest)) for path, digest in files))


def answer(folder: Path, pid: int, reply: Answer) -> None:
    """Write down worker ``pid``'s answer; worker 0 finds out without it when it cannot."""
    with contextlib.suppress(OSError):
        _write(folder / _ANSWER.format(pid=pid), dataclasses.asdict(reply))


def answers(folder: Path, ask_id: str) -> dict[int, Answer]:
    """The answers to request ``ask_id`` written down so far, by worker pid."""
    found = {}
    for path in folder.glob(_ANSWER.format(pid="*")):
        value = _read(path)
        pid = path.name.removeprefix("reload-answer-").removesuffix(".json")
        if value is None or value.get("ask_id") != ask_id or not pid.isdigit():
            continue
        found[int(pid)] = Answer(
            ask_id,
            value.get("ok") is True,
            value.get("changed") is True,
            str(value.get("message", "")),
        )
    return found
