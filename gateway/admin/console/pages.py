"""The console's pages, as pure functions of what they show: no I/O, no request.

Rule: a page shows ids, targets, states, statuses, reasons, fields, WABA ids, sizes and
certificate facts; never a notification body, a phone number, a name or message text. Each
function returns the page's body; :func:`~gateway.admin.console.html.frame` wraps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from gateway.admin.console.facts import CertificateFacts, body_facts
from gateway.admin.console.html import PREFIX, age, esc, form, moment, table
from gateway.admin.stats import Totals
from gateway.delivery.answers import shown_answer
from gateway.delivery.backoff import Breaker
from gateway.outbox import STATES, AttemptRecord, Backlog, Delivery

__all__ = [
    "Listing",
    "certificates",
    "confirm_replay_dead",
    "deliveries",
    "delivery",
    "overview",
    "sign_in",
]


def _delivery_link(delivery_id: str) -> str:
    return f'<a href="{PREFIX}/deliveries/{quote(delivery_id)}">{esc(delivery_id)}</a>'


def _state(state: str) -> str:
    return f'<span class="state {esc(state)}">{esc(state)}</span>'


def _breaker(breaker: Breaker | None, now: float) -> str:
    if breaker is None:
        return '<span class="muted">-</span>'
    text = breaker.state
    failures = f"{breaker.failures} failure{'' if breaker.failures == 1 else 's'}"
    if breaker.state == "open":
        text += f" ({failures}; probe in {age(breaker.paused_until - now)})"
    elif breaker.state == "half-open":
        text += f" (probing after {failures})"
    return f'<span class="breaker {esc(breaker.state)}">{esc(text)}</span>'


def _numbers(pairs: Sequence[tuple[str, str]]) -> str:
    cells = "".join(
        f'<div class="number"><span class="value">{esc(v)}</span>'
        f'<span class="label">{esc(k)}</span></div>'
        for k, v in pairs
    )
    return f'<div class="numbers">{cells}</div>'


@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """How a target's deliveries are held back on purpose: its order mode, its rate limit,
    and how many conversations have a delivery waiting (a count: never whose)."""

    order: str
    rate_per_s: float | None
    burst: int
    held_back: int

    def rate(self) -> str:
        if self.rate_per_s is None:
            return "none"
        return f"{self.rate_per_s:g}/s, burst {self.burst}"


def _pace(pace: Pace | None) -> list[str]:
    if pace is None:
        return ["", "", ""]
    held = esc(pace.held_back) if pace.order == "conversation" else ""
    return [esc(pace.order), esc(pace.rate()), held]


def overview(
    totals: Totals,
    counts: Mapping[str, int],
    backlog: Sequence[Backlog],
    targets: Sequence[str],
    breakers: Mapping[str, Breaker],
    now: float,
    paces: Mapping[str, Pace] | None = None,
) -> str:
    """Counters, each target's backlog, breaker, order and rate limit, and the last client
    certificate seen."""
    by_target = {b.target: b for b in backlog}
    names = list(targets) + sorted(set(by_target) - set(targets))
    rows = []
    for name in names:
        owed = by_target.get(name)
        pending, dead = (owed.pending, owed.dead) if owed else (0, 0)
        oldest = owed.oldest_pending_at if owed else None
        listing = f"{PREFIX}/deliveries?{urlencode({'target': name})}"
        dead_cell = esc(dead)
        if dead:
            dead_link = f"{PREFIX}/deliveries?{urlencode({'target': name, 'state': 'dead'})}"
            replay = f"{PREFIX}/targets/{quote(name, safe='')}/replay-dead"
            dead_cell = (
                f'<a href="{esc(dead_link)}">{dead}</a> '
                f'<a class="button" href="{esc(replay)}">Replay all</a>'
            )
        rows.append(
            [
                f'<a href="{esc(listing)}">{esc(name)}</a>'
                + ("" if name in targets else ' <span class="muted">(not configured)</span>'),
                esc(pending),
                dead_cell,
                esc(age(None if oldest is None else now - oldest)),
                _breaker(breakers.get(name), now),
                *_pace((paces or {}).get(name)),
            ]
        )
    rejections = table(
        ["reason", "requests"],
        [[esc(reason), esc(n)] for reason, n in totals.rejected.items()],
        empty="No request refused since the gateway started.",
    )
    if totals.last_client is None:
        last = '<p class="empty">No client certificate seen since the gateway started.</p>'
    else:
        cn, when = totals.last_client
        # With listen.proxy_protocol, the client's address from the balancer's header.
        origin = "" if totals.last_address is None else f" from {esc(totals.last_address)}"
        last = (
            f"<p><code>{esc(cn)}</code>{origin} at {esc(moment(when))}"
            f" ({esc(age(now - when))} ago)</p>"
        )
    clients = table(
        ["client certificate CN", "connections"],
        [[f"<code>{esc(cn)}</code>", esc(n)] for cn, n in totals.clients.items()],
        empty="No connection yet.",
    )
    return (
        _numbers(
            [
                ("accepted", str(totals.accepted)),
                ("duplicates", str(totals.duplicates)),
                ("rejected", str(sum(totals.rejected.values()))),
                *[(state, str(counts.get(state, 0))) for state in STATES],
            ]
        )
        + "<h2>Targets</h2>"
        + table(
            [
                "target",
                "pending",
                "dead",
                "oldest pending",
                "circuit breaker",
                "order",
                "rate limit",
                "conversations held back",
            ],
            rows,
            empty="No target configured.",
        )
        + "<h2>Rejections by reason</h2>"
        + rejections
        + "<h2>Last client certificate</h2>"
        + last
        + clients
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """One page of the deliveries list and the filter that made it."""

    found: Sequence[Delivery]
    state: str | None
    target: str | None
    page: int
    more: bool


def _filter(listing: Listing, targets: Sequence[str]) -> str:
    def options(values: Sequence[str], chosen: str | None, everything: str) -> str:
        out = f'<option value="">{esc(everything)}</option>'
        for value in values:
            picked = " selected" if value == chosen else ""
            out += f'<option value="{esc(value)}"{picked}>{esc(value)}</option>'
        return out

    return (
        f'<form method="get" action="{PREFIX}/deliveries" class="filter">'
        f'<label>State <select name="state">{options(STATES, listing.state, "any")}</select>'
        f'</label><label>Target <select name="target">'
        f"{options(targets, listing.target, 'any')}</select></label>"
        '<button type="submit">Show</button></form>'
    )


def deliveries(listing: Listing, targets: Sequence[str], now: float) -> str:
    """The filter form, one page of deliveries (most recently changed first) and paging."""
    rows = [
        [
            _delivery_link(d.id),
            esc(d.target),
            _state(d.state),
            esc(d.attempts),
            esc("-" if d.last_status is None else d.last_status),
            esc((d.last_error or "")[:80]),
            esc(moment(d.received_at)),
            esc(len(d.body)),
        ]
        for d in listing.found
    ]
    query = {k: v for k, v in (("state", listing.state), ("target", listing.target)) if v}
    links = []
    if listing.page > 1:
        newer = urlencode(query | {"page": str(listing.page - 1)})
        links.append(f'<a href="{PREFIX}/deliveries?{esc(newer)}" rel="prev">Newer</a>')
    links.append(f"<span>page {listing.page}</span>")
    if listing.more:
        older = urlencode(query | {"page": str(listing.page + 1)})
        links.append(f'<a href="{PREFIX}/deliveries?{esc(older)}" rel="next">Older</a>')
    return (
        _filter(listing, targets)
        + table(
            ["id", "target", "state", "attempts", "HTTP", "reason", "received", "bytes"],
            rows,
            empty="No delivery matches.",
        )
        + f'<nav class="pages">{" ".join(links)}</nav>'
    )


def delivery(d: Delivery, attempts: Sequence[AttemptRecord], csrf: str, now: float) -> str:
    """One delivery's facts, every recorded attempt, and its replay button."""
    fields, wabas = body_facts(d.body)
    facts = [
        ("id", f"<code>{esc(d.id)}</code>"),
        ("target", esc(d.target)),
        ("state", _state(d.state)),
        ("attempts", esc(d.attempts)),
        ("received", esc(moment(d.received_at))),
        ("created", esc(moment(d.created_at))),
        ("next attempt" if d.state == "pending" else "last change", esc(moment(d.next_attempt_at))),
        ("body", esc(f"{len(d.body)} bytes" + (", one change (split)" if d.split else ""))),
        ("fields", esc(", ".join(fields) or "-")),
        ("WABA ids", esc(", ".join(wabas) or "-")),
        ("last reason", esc(d.last_error or "-")),
    ]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    history = table(
        ["#", "time", "outcome", "HTTP", "error", "target's answer (excerpt)"],
        [
            [
                esc(a.number),
                esc(moment(a.at)),
                _state(a.state),
                esc("-" if a.status is None else a.status),
                esc(a.error or ""),
                f"<code>{esc(shown_answer(a.response))}</code>" if a.response else "",
            ]
            for a in attempts
        ],
        empty="No attempt recorded yet.",
        css="attempts",
    )
    replay = form(f"{PREFIX}/deliveries/{quote(d.id)}/replay", csrf, "Replay now")
    return f'<table class="facts">{rows}</table>{replay}<h2>Attempts</h2>{history}'


def confirm_replay_dead(target: str, dead: int, csrf: str) -> str:
    """The confirmation asked before replaying all of a target's dead letters."""
    if not dead:
        return f"<p>Target <strong>{esc(target)}</strong> has no dead letter.</p>"
    action = f"{PREFIX}/targets/{quote(target, safe='')}/replay-dead"
    return (
        f'<p class="warning">Replay all <strong>{dead}</strong> dead letters of target '
        f"<strong>{esc(target)}</strong>? Each is sent again, due now, with a fresh attempt "
        "count. The target receives the same delivery ids again.</p>"
        + form(action, csrf, f"Replay {dead} dead letters", css="confirm")
        + '<p><a href="/">Cancel</a></p>'
    )


def certificates(found: Sequence[CertificateFacts]) -> str:
    """The server certificate and each client CA: subject, fingerprint, days left."""
    rows = []
    for cert in found:
        if cert.problem is not None:
            rows.append(
                [esc(cert.role), f'<span class="bad">{esc(cert.problem)}</span>', "", "", ""]
            )
            continue
        days = cert.days_left or 0.0
        css = "bad" if days < 14 else "warn" if days < 30 else "good"
        rows.append(
            [
                esc(cert.role),
                f"<code>{esc(cert.subject)}</code>",
                f'<code class="fingerprint">{esc(cert.fingerprint)}</code>',
                esc(cert.not_after.strftime("%Y-%m-%d") if cert.not_after else "-"),
                f'<span class="{css}">{int(days)}</span>',
            ]
        )
    return table(
        ["role", "subject", "SHA-256 fingerprint", "expires", "days left"],
        rows,
        empty="No certificate configured.",
    )


def sign_in(csrf: str, next_path: str, problem: str | None) -> str:
    """The sign-in form: the admin token, sent once, exchanged for a session cookie."""
    note = f'<p class="bad">{esc(problem)}</p>' if problem else ""
    return (
        f'{note}<form method="post" action="{PREFIX}/sign-in" class="sign-in">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        '<label>Admin token <input type="password" name="token" autocomplete="current-password"'
        " required autofocus></label>"
        '<button type="submit">Sign in</button></form>'
    )
