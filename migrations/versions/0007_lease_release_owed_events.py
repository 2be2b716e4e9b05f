"""leases keep who held them last (released_at); events of undelivered changes are not owed;
members whose acknowledged email is not the contact's (email_drift); rate_limits.claimed_at

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # A released lease stays as a row naming its last holder, so a holder that lost it can
    # say who took it over, even after the taker finished.
    op.add_column("leases", sa.Column("released_at", sa.DateTime(), nullable=True))
    # An event is owed only for a delivered change: a refused or superseded change's event
    # was left `pending` by older versions, and kept the fast path and prune waiting on it.
    op.execute(
        "UPDATE member_changes SET event_status = NULL "
        "WHERE status IN ('failed', 'superseded') AND event_status IN ('pending', 'failed')"
    )
    # When the last claim was made (database time): a clock that steps back is noticed.
    op.add_column("rate_limits", sa.Column("claimed_at", sa.Double(), nullable=True))
    op.create_table(
        "email_drift",
        sa.Column("audience_key", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("audience_key", "user_id", name=op.f("pk_email_drift")),
    )
    op.execute(
        "INSERT INTO email_drift (audience_key, user_id) "
        "SELECT m.audience_key, m.user_id FROM memberships m "
        "JOIN contacts c ON c.user_id = m.user_id WHERE m.email <> c.email"
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("email_drift")
    with op.batch_alter_table("rate_limits", schema=None) as batch_op:
        batch_op.drop_column("claimed_at")
    # Older versions delete a released lease: drop the released rows, as they would have.
    op.execute("DELETE FROM leases WHERE released_at IS NOT NULL")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("released_at")
