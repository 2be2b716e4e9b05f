"""reconcile: reconciles and gist_holdings; sync_runs counts what a reconcile read

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "reconciles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("audience_keys", sa.Text(), nullable=False),
        sa.Column("per_page", sa.Integer(), nullable=False),
        sa.Column("next_page", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("contacts", sa.Integer(), nullable=False),
        sa.Column("leads", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciles")),
    )
    op.create_table(
        "gist_holdings",
        sa.Column("reconcile_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("value", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["reconcile_id"],
            ["reconciles.id"],
            name=op.f("fk_gist_holdings_reconcile_id_reconciles"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("reconcile_id", "key", "user_id", name=op.f("pk_gist_holdings")),
    )
    # Plain ADD COLUMNs: a batch would rebuild sync_runs on SQLite, which member_changes'
    # foreign key forbids.
    op.add_column("sync_runs", sa.Column("contacts_read", sa.Integer(), nullable=True))
    op.add_column("sync_runs", sa.Column("pages_read", sa.Integer(), nullable=True))
    op.add_column("sync_runs", sa.Column("leads", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("leads")
        batch_op.drop_column("pages_read")
        batch_op.drop_column("contacts_read")
    op.drop_table("gist_holdings")
    op.drop_table("reconciles")
