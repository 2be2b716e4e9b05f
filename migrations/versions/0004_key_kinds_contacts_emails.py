"""key kinds, acknowledged contact emails, resent counts, email conflicts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 05:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resent", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("email_conflicts", sa.Integer(), server_default="0", nullable=False)
        )
    op.create_table(
        "email_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("used_email", sa.String(length=320), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_email_conflicts_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_conflicts")),
    )
    op.create_index(
        "ix_email_conflicts_run_id_user_id", "email_conflicts", ["run_id", "user_id"], unique=False
    )
    op.create_table(
        "contacts",
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("last_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_contacts")),
    )
    # A key whose state lives in trait_values was a trait; one with memberships an audience.
    # Where both hold rows nothing tells which came last: left unset, retire then clears both.
    op.execute(
        "UPDATE audiences SET kind = 'trait' WHERE key IN (SELECT trait_key FROM trait_values)"
        " AND key NOT IN (SELECT audience_key FROM memberships)"
    )
    op.execute(
        "UPDATE audiences SET kind = 'audience' WHERE kind IS NULL"
        " AND key NOT IN (SELECT trait_key FROM trait_values)"
    )
    # The email Gist holds for each user: the one of their newest acknowledgement.
    op.execute(
        """
        INSERT INTO contacts (user_id, email, updated_at, last_run_id)
        SELECT user_id, email, since, last_run_id FROM (
            SELECT user_id, email, since, last_run_id, ROW_NUMBER() OVER (
                PARTITION BY user_id ORDER BY last_run_id DESC, since DESC, email
            ) AS newest
            FROM (
                SELECT user_id, email, since, last_run_id FROM memberships
                UNION ALL
                SELECT user_id, email, since, last_run_id FROM trait_values
            ) AS acknowledged
        ) AS ranked
        WHERE newest = 1
        """
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("contacts")
    op.drop_index("ix_email_conflicts_run_id_user_id", table_name="email_conflicts")
    op.drop_table("email_conflicts")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_column("email_conflicts")
        batch_op.drop_column("resent")
    with op.batch_alter_table("audiences", schema=None) as batch_op:
        batch_op.drop_column("kind")
