"""The ``audience-sync`` command line: parse flags, build objects, call the library, render.

A thin layer, one module per command group, as dbt's ``cli/`` is laid out:

- ``app``: the parser, ``main`` and ``run_cli`` (errors → one line and an exit code);
- ``syncing``: ``run``, ``backfill``, ``retire``, ``daemon``;
- ``history``: ``history``, ``show``, ``prune``;
- ``audiences``: ``audiences``, ``workers``, ``verify``;
- ``admin``: ``demo``, ``init``, ``completion``, ``db upgrade``;
- shared by them: ``options`` (flags, argument types, settings), ``output`` (exit codes,
  errors, log lines) and ``signals``.
"""

from audience_sync.cli.app import build_parser, command_parsers, help_pages, main, run_cli

__all__ = ["build_parser", "command_parsers", "help_pages", "main", "run_cli"]
