"""Create the jobs table: the job records the API shows, and the queue that workers claim from.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pocketllm.db.types import JSONType, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = sa.text("status IN ('pending', 'processing')")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("job_type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("input_data", JSONType, nullable=False),
        sa.Column("output_data", JSONType, nullable=True),
        sa.Column("error_log", sa.Text(), nullable=True),
        sa.Column("metadata", JSONType, nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("schedule_key", sa.String(length=160), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_at", UTCDateTime(), nullable=False),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("worker_id", sa.String(length=120), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_not_negative")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_jobs_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("schedule_key", name=op.f("uq_jobs_schedule_key")),
        sa.UniqueConstraint("user_id", "idempotency_key", name=op.f("uq_jobs_user_id_idempotency_key")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_run_at", ["run_at"], unique=False, postgresql_where=_ACTIVE, sqlite_where=_ACTIVE
        )
        batch_op.create_index("ix_jobs_user_id_created_at", ["user_id", "created_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_id_created_at")
        batch_op.drop_index("ix_jobs_run_at", postgresql_where=_ACTIVE, sqlite_where=_ACTIVE)

    op.drop_table("jobs")
