"""Keep the avatar's storage key on the profile instead of a URL.

Responses render the URL from the key, so a change of storage or public address needs no data change.
No stored avatar URL can be turned into a key, so existing values are dropped.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite's batch mode copies the table and cannot carry an expression index over, so the username
    # index is dropped first and created again afterwards, on both databases alike.
    op.drop_index("uq_profiles_username_lower", table_name="profiles")
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("avatar_key", sa.String(length=300), nullable=True))
        batch_op.drop_column("avatar_url")
    op.create_index("uq_profiles_username_lower", "profiles", [sa.text("lower(username)")], unique=True)


def downgrade() -> None:
    op.drop_index("uq_profiles_username_lower", table_name="profiles")
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("avatar_url", sa.Text(), nullable=True))
        batch_op.drop_column("avatar_key")
    op.create_index("uq_profiles_username_lower", "profiles", [sa.text("lower(username)")], unique=True)
