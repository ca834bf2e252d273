"""The admin listener's web console: overview, deliveries, attempts, replay, certificates.

Rule: server-rendered HTML with no script, no build step and no external asset; it shows
delivery metadata only, never a notification body (see :mod:`.pages`), and it is guarded like
the admin API (see :mod:`.views`).
"""

from gateway.admin.console.views import SECURITY_HEADERS, Console, is_console_path

__all__ = ["SECURITY_HEADERS", "Console", "is_console_path"]
