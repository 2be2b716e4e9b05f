"""``audience-sync init``: a commented starter config and an example members CSV."""

from __future__ import annotations

from pathlib import Path

from audience_sync.config import DEFAULT_CONFIG
from audience_sync.errors import ConfigError

MEMBERS_FILE = "members.csv"

STARTER_CONFIG = f"""\
# audience-sync configuration, written by `audience-sync init`.
# `${{VAR}}` anywhere in a string is replaced from the environment; a missing variable is
# an error that names it. Relative paths are relative to this file.
# Every key is described in docs/configuration.md of audience-sync.

[state]
# What Gist acknowledged, per audience and member. SQLite (this file) needs nothing else.
# For PostgreSQL: pip install 'audience-sync[postgres]', set
#   url = "postgresql://sync@db.internal/audience_sync"
#   schema = "audience_sync"        # optional: keep the state tables in their own schema
# and run `audience-sync db upgrade` once.
url = "sqlite:///audience_sync.db"

[gist]
api_key = "${{GIST_API_KEY}}"         # Gist > Settings > API Key; never the key itself here
base_url = "https://api.getgist.com"
requests_per_second = 10            # client-side limit, retries included

# Each audience sets one Gist custom property: snake_case(name) = true while a contact is
# a member, false once they leave.
[[audiences]]
name = "Example Members"            # property: example_members
file = "{MEMBERS_FILE}"             # CSV with a header naming user_id and email
# every = "15m"                     # for `audience-sync daemon`: an interval...
# schedule = "0 */2 * * *"          # ...or a cron expression

# An audience from a SQL query (any SQLAlchemy URL; queries run read-only):
# [sources.warehouse]
# url = "postgresql://reader@warehouse.internal/analytics"
#
# [[audiences]]
# name = "VIP Customers"            # property: vip_customers
# source = "warehouse"
# query = "SELECT user_id, email FROM customers WHERE lifetime_value > 1000"
"""

EXAMPLE_MEMBERS = """\
user_id,email
1001,ada@example.com
1002,grace@example.com
1003,linus@example.com
"""


def write_starter(folder: Path) -> list[Path]:
    """Write the starter config and example CSV into ``folder``; return their paths.

    Refuses (``ConfigError``) before writing anything when either file exists.
    """
    files = {folder / DEFAULT_CONFIG: STARTER_CONFIG, folder / MEMBERS_FILE: EXAMPLE_MEMBERS}
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise ConfigError(f"{', '.join(existing)} already exists; init never overwrites a file")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        # "x": even a file created since the check above is never overwritten.
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
    return list(files)
