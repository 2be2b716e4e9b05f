"""member_changes without a foreign key to sync_runs: a plan of a million changes no longer
checks its one run a million times

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 04:00:00

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "fk_member_changes_run_id_sync_runs"


def upgrade() -> None:
    """Upgrade schema: drop ``member_changes.run_id``'s foreign key.

    PostgreSQL checks a foreign key with a trigger per inserted row: a plan of 1M changes
    (a first sync, a backfill, their dry runs) spent ~5.5 s of its ~10 s there, checking
    the same ``sync_runs`` row each time. Every plan row is written by its own run after
    that run's row was committed, and runs are never deleted (``prune`` deletes changes,
    not runs), so the key held by construction. SQLite rebuilds the table (it cannot drop
    a constraint); its indexes are rebuilt as they were."""
    with op.batch_alter_table("member_changes", schema=None) as batch_op:
        batch_op.drop_constraint(CONSTRAINT, type_="foreignkey")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("member_changes", schema=None) as batch_op:
        batch_op.create_foreign_key(CONSTRAINT, "sync_runs", ["run_id"], ["id"])
