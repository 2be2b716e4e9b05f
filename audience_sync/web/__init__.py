"""The history in a browser: read-only pages over the state database (``audience-sync ui``).

- ``app``: the routes, their templates and the guard (basic auth, Host check, headers);
- ``state``: the read-only engine the pages read through;
- ``charts``: an audience's growth as server-drawn SVG;
- ``serve``: the bind rule (loopback, or a password) and the server;
- ``templates/`` and ``static/``: Jinja2 templates and the style sheet, shipped in the wheel.

The queries sit beside ``history.py`` in ``pages.py``; what the CLI shows too (runs, a run,
workers) comes from the same functions.
"""

PASSWORD_ENV = "AUDIENCE_SYNC_UI_PASSWORD"  # noqa: S105 - the variable's name, not a password
"""The environment variable holding the pages' password (HTTP basic auth)."""
DEFAULT_PORT = 8787
