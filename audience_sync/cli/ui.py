"""The history in a browser: ``ui``."""

from __future__ import annotations

import argparse
import os

from audience_sync.cli.options import Commands, int_arg, naming_config, settings_for
from audience_sync.cli.output import EXIT_OK
from audience_sync.errors import StateError
from audience_sync.web import DEFAULT_PORT, PASSWORD_ENV


def register(commands: Commands) -> None:
    """``ui``."""
    ui = commands.add(
        "ui", "serve the history as read-only web pages",
        "Serve read-only pages over the state database: runs, a run's changes, an audience's "
        "growth, one user across every key, the workers. Binds 127.0.0.1; another address "
        f"needs a password in ${PASSWORD_ENV} (HTTP basic auth). Ctrl-C or SIGTERM stops it.",
        handler=cmd_ui, needs_gist=False,
    )  # fmt: skip
    ui.add_argument(
        "--host", default="127.0.0.1",
        help=f"address to bind (default 127.0.0.1; another needs ${PASSWORD_ENV})",
    )  # fmt: skip
    ui.add_argument(
        "--port", type=int_arg(0, 65535), default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )  # fmt: skip


def cmd_ui(args: argparse.Namespace) -> int:
    # Starlette, Jinja2 and uvicorn load for this command only.
    from audience_sync.web.app import create_app
    from audience_sync.web.serve import allowed_hosts, bind, check_bind, serve, url_of
    from audience_sync.web.state import open_pages_state

    password = os.environ.get(PASSWORD_ENV) or None
    check_bind(args.host, password)  # before anything is opened
    settings = settings_for(args)
    try:
        engine = open_pages_state(settings)
    except StateError as exc:
        raise naming_config(exc, settings) from None
    try:
        app = create_app(
            engine,
            password=password,
            allowed_hosts=allowed_hosts(args.host, password),
            requests_per_second=settings.gist.requests_per_second,
        )
        sock = bind(args.host, args.port)
        print(
            f"serving the history at {url_of(sock)} (read-only"
            + (", basic auth" if password else "")
            + "); Ctrl-C stops",
            flush=True,
        )
        serve(app, sock)
    finally:
        engine.dispose()
    return EXIT_OK
