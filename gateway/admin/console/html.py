"""The console's HTML building blocks: escaping, the page frame, tables, forms, times.

Rule: every value that reaches a page goes through :func:`esc` (or a helper that calls it), so
nothing from a target's answer, a certificate or a URL can become markup. Pages carry no script
and no inline style: the Content-Security-Policy allows neither (see ``views.SECURITY_HEADERS``).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Sequence

__all__ = [
    "PREFIX",
    "age",
    "esc",
    "form",
    "frame",
    "moment",
    "table",
]

PREFIX = "/console"
_NAV = (
    ("/", "Overview"),
    (f"{PREFIX}/deliveries", "Deliveries"),
    (f"{PREFIX}/certificates", "Certificates"),
)


def esc(value: object) -> str:
    """``value`` as text safe inside an element or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def moment(when: float | None) -> str:
    """A UTC time to the second, or a dash."""
    if when is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float | None) -> str:
    """A duration for people: ``42s``, ``3m 12s``, ``5h 02m``, ``2d 4h``; a dash for None."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str, css: str = ""
) -> str:
    """A table of cells that are already HTML (escape them first); ``empty`` if no rows."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    klass = f' class="{esc(css)}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def form(
    action: str, csrf: str, label: str, *, css: str = "", hidden: dict[str, str] | None = None
) -> str:
    """A POST form with its CSRF token and one button."""
    fields = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in (hidden or {}).items()
    )
    klass = f' class="{esc(css)}"' if css else ""
    return (
        f'<form method="post" action="{esc(action)}"{klass}>'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">{fields}'
        f'<button type="submit">{esc(label)}</button></form>'
    )


def frame(title: str, body: str, *, path: str, csrf: str | None, sign_out: bool) -> str:
    """A whole page: the navigation (``path`` marks the current one; none before signing in,
    that is without ``csrf``), then ``body``."""
    here = ' class="here"'
    links = "".join(
        f'<a href="{esc(href)}"{here if href == path else ""}>{esc(name)}</a>'
        for href, name in _NAV
        if csrf is not None
    )
    out = ""
    if sign_out and csrf is not None:
        out = form(f"{PREFIX}/sign-out", csrf, "Sign out", css="sign-out")
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - waba-gateway</title>"
        f'<link rel="stylesheet" href="{PREFIX}/static/console.css"></head>'
        f'<body><header><span class="brand">waba-gateway</span><nav>{links}</nav>{out}</header>'
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>\n"
    )
