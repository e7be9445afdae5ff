"""Send a notice on `pocketllm_sessions` when a session or a user's e-mail changes (PostgreSQL only).

API processes keep the sessions they have checked and forget one when a notice names it, its user or
the whole table (see auth/session_cache.py). Triggers send the notices, so changes made outside this
server, such as an operator revoking a session in psql, reach every process too. PostgreSQL delivers the
notices when the transaction commits, and not at all when it rolls back. SQLite has no notices and no
session cache, so this revision does nothing there.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE FUNCTION pocketllm_session_notice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('pocketllm_sessions', '*');
    ELSIF TG_TABLE_NAME = 'auth_sessions' THEN
        PERFORM pg_notify('pocketllm_sessions', 's:' || OLD.id::text);
    ELSE
        PERFORM pg_notify('pocketllm_sessions', 'u:' || OLD.id::text);
    END IF;
    RETURN NULL;
END
$$
"""

_TRIGGERS = (
    "CREATE TRIGGER auth_sessions_changed AFTER UPDATE OF revoked_at, expires_at, user_id OR DELETE "
    "ON auth_sessions FOR EACH ROW EXECUTE FUNCTION pocketllm_session_notice()",
    "CREATE TRIGGER auth_sessions_emptied AFTER TRUNCATE ON auth_sessions "
    "FOR EACH STATEMENT EXECUTE FUNCTION pocketllm_session_notice()",
    "CREATE TRIGGER users_changed AFTER UPDATE OF email OR DELETE "
    "ON users FOR EACH ROW EXECUTE FUNCTION pocketllm_session_notice()",
    "CREATE TRIGGER users_emptied AFTER TRUNCATE ON users "
    "FOR EACH STATEMENT EXECUTE FUNCTION pocketllm_session_notice()",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_FUNCTION)
    for statement in _TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for trigger, table in (
        ("auth_sessions_changed", "auth_sessions"),
        ("auth_sessions_emptied", "auth_sessions"),
        ("users_changed", "users"),
        ("users_emptied", "users"),
    ):
        op.execute(f"DROP TRIGGER {trigger} ON {table}")
    op.execute("DROP FUNCTION pocketllm_session_notice()")
