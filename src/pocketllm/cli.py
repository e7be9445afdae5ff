"""The `pocketllm` command: serve the API, apply migrations and run operator tasks."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from alembic.script.revision import RevisionError
from alembic.util import CommandError
from cryptography.fernet import Fernet
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm import __version__
from pocketllm.config import ConfigurationError, Settings, load_settings
from pocketllm.db.engine import Database, DatabaseFileError, create_engine
from pocketllm.db.migrate import current_revision, head_revision, upgrade_database
from pocketllm.errors import InvalidInput
from pocketllm.kit.logging import configure_logging
from pocketllm.kit.memory import use_system_allocator

T = TypeVar("T")

DESCRIPTION = """\
PocketLLM Server: the backend of the PocketLLM chat app.

Settings come from environment variables and a .env file in the working directory (see
docs/configuration.md). Without any, the server keeps its SQLite database and generated secrets in
./pocketllm-data (DATA_DIR).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketllm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="apply pending migrations, then serve the HTTP API", description="Serve the HTTP API."
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="number of API worker processes (default: %(default)s); use PostgreSQL for more than one",
    )
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="do not run background jobs in the API processes; run `pocketllm worker` for them instead",
    )

    worker = commands.add_parser(
        "worker",
        help="run background jobs (image generation, maintenance) without serving HTTP",
        description=(
            "Claim and run background jobs until SIGTERM or SIGINT. Any number of workers, on any hosts, may "
            "share one PostgreSQL database. On SQLite, run one worker on the same machine as the server "
            "(`pocketllm serve --no-worker`), or keep the worker inside `pocketllm serve`."
        ),
    )
    worker.add_argument(
        "--concurrency", type=int, default=None, help="jobs run at the same time (default: JOB_CONCURRENCY, 4)"
    )

    migrate = commands.add_parser(
        "migrate", help="apply database migrations", description="Upgrade the database schema."
    )
    migrate.add_argument("--revision", default="head", help="target revision (default: %(default)s)")
    migrate.add_argument("--show", action="store_true", help="print the current and latest revision only")

    invites = commands.add_parser("invites", help="create and list invite codes")
    invite_commands = invites.add_subparsers(dest="invites_command", required=True, metavar="ACTION")
    create = invite_commands.add_parser("create", help="create an invite code and print it")
    create.add_argument("--max-uses", type=int, default=1, help="how many sign-ups it allows (default: 1)")
    create.add_argument("--expires-in-days", type=float, default=None, help="days until it expires (default: never)")
    create.add_argument("--code", default=None, help="use this code instead of a random one")
    invite_commands.add_parser("list", help="list invite codes with their use counts")

    waitlist = commands.add_parser("waitlist", help="manage waitlist applications")
    waitlist_commands = waitlist.add_subparsers(dest="waitlist_command", required=True, metavar="ACTION")
    approve = waitlist_commands.add_parser(
        "approve", help="approve an application so that its e-mail address can sign up without a code"
    )
    approve.add_argument("email", help="the applicant's e-mail address")
    reject = waitlist_commands.add_parser(
        "reject", help="reject an application; an approved address can no longer sign up without a code"
    )
    reject.add_argument("email", help="the applicant's e-mail address")
    waitlist_list = waitlist_commands.add_parser("list", help="list waitlist applications, newest first")
    waitlist_list.add_argument(
        "--status", choices=["pending", "approved", "rejected"], default=None, help="only list this status"
    )

    users = commands.add_parser("users", help="account maintenance")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    user_commands.add_parser(
        "purge-deleted",
        help="permanently delete every account whose scheduled deletion date has passed, with its files",
    )

    keys = commands.add_parser("keys", help="encryption key tools")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_commands.add_parser("generate", help="print a new random key for ENCRYPTION_KEY")
    key_commands.add_parser(
        "rotate",
        help="re-encrypt every stored provider key under the first ENCRYPTION_KEY entry",
        description=(
            "Re-encrypt stored provider keys under the first (primary) ENCRYPTION_KEY entry. Rotate a key by "
            "putting a new key first in ENCRYPTION_KEY, running this, then removing the old key."
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)

    if arguments.command == "keys" and arguments.keys_command == "generate":
        print(Fernet.generate_key().decode())
        return 0

    try:
        settings = load_settings()
    except (ConfigurationError, ValidationError) as error:
        print(f"pocketllm: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    try:
        if arguments.command == "serve":
            # Only for the process's own command line: `main(["serve"])` called from other code must not
            # exec. On SQLite glibc's allocator cost more CPU per reply than it does on PostgreSQL, and a
            # SQLite server is one process for few users, so it keeps CPython's allocator.
            if argv is None and not settings.is_sqlite:
                use_system_allocator()
            return _serve(
                settings, arguments.host, arguments.port, arguments.workers, run_worker=not arguments.no_worker
            )
        if arguments.command == "worker":
            return _run_worker(settings, arguments.concurrency)
        if arguments.command == "migrate":
            return _migrate(settings, arguments.revision, show=arguments.show)
        if arguments.command == "invites":
            if arguments.invites_command == "create":
                return _run_in_transaction(
                    settings,
                    lambda session: _create_invite(
                        session, arguments.max_uses, arguments.expires_in_days, arguments.code
                    ),
                )
            return _run_in_transaction(settings, _list_invites)
        if arguments.command == "waitlist":
            if arguments.waitlist_command == "list":
                return _run_in_transaction(settings, lambda session: _list_applications(session, arguments.status))
            if arguments.waitlist_command == "reject":
                return _run_in_transaction(settings, lambda session: _reject(session, arguments.email))
            return _run_in_transaction(settings, lambda session: _approve(session, arguments.email))
        if arguments.command == "keys":
            return _run_in_transaction(settings, lambda session: _rotate_keys(session, settings))
        if arguments.command == "users":
            return asyncio.run(_purge_deleted(settings))
    except InvalidInput as error:
        print(f"pocketllm: {error.message}", file=sys.stderr)
        return 2
    except (DBAPIError, ConnectionError, TimeoutError, socket.gaierror, DatabaseFileError) as error:
        # The database in DATABASE_URL is down, unreachable, silent or missing. The driver's message names
        # the address or the database; tests/test_cli.py checks that it leaves out the password.
        reason = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
        # asyncpg's connect timeout raises a TimeoutError without a message.
        detail = str(reason) or ("the connection timed out" if isinstance(reason, TimeoutError) else repr(reason))
        print(f"pocketllm: the database in DATABASE_URL cannot be used: {detail}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {arguments.command}")


def _serve(settings: Settings, host: str, port: int, workers: int, *, run_worker: bool) -> int:
    import uvicorn

    if workers < 1:
        print("pocketllm: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1 and settings.is_sqlite:
        print(
            "pocketllm: several workers need PostgreSQL (set DATABASE_URL); SQLite allows one writer process.",
            file=sys.stderr,
        )
        return 2

    # Migrate once here, so that worker processes do not race to do it.
    if settings.migrate_on_start:
        asyncio.run(_upgrade(settings, "head"))
    os.environ["MIGRATE_ON_START"] = "false"
    if not run_worker:
        os.environ["RUN_WORKER"] = "false"
    # Workers re-read the settings; point them at the same data directory and generated secrets.
    os.environ.setdefault("DATA_DIR", str(settings.data_dir))

    uvicorn.run(
        "pocketllm.app:create_app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        # Open requests, replies among them, get this long to finish after SIGTERM; then they are cancelled.
        timeout_graceful_shutdown=graceful_shutdown_seconds(settings),
    )
    return 0


def graceful_shutdown_seconds(settings: Settings) -> int:
    """Return SHUTDOWN_GRACE_SECONDS as the whole seconds uvicorn takes, rounded up so that 0.5 is not 0."""
    return math.ceil(settings.shutdown_grace_seconds)


def _run_worker(settings: Settings, concurrency: int | None) -> int:
    if concurrency is not None and concurrency < 1:
        print("pocketllm: --concurrency must be at least 1", file=sys.stderr)
        return 2
    asyncio.run(_work(settings, concurrency))
    return 0


async def _work(settings: Settings, concurrency: int | None) -> None:
    from pocketllm.app import build_provider_runtime
    from pocketllm.jobs.handlers import build_job_worker
    from pocketllm.storage.service import build_storage

    database = Database(
        create_engine(
            settings.effective_database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout_seconds,
        )
    )
    providers = build_provider_runtime(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        if settings.migrate_on_start:
            await upgrade_database(database.engine)
        worker = build_job_worker(settings, database, build_storage(settings), providers, concurrency=concurrency)
        await worker.run(stop)
    finally:
        await providers.close()
        await database.dispose()


def _migrate(settings: Settings, revision: str, *, show: bool) -> int:
    if show:
        current = asyncio.run(_with_engine(settings, current_revision))
        print(f"current: {current or '(empty database)'}")
        print(f"latest:  {head_revision()}")
        return 0
    before = asyncio.run(_with_engine(settings, current_revision))
    try:
        asyncio.run(_upgrade(settings, revision))
    except (CommandError, RevisionError) as error:
        print(f"pocketllm: cannot migrate to revision {revision!r}: {error}", file=sys.stderr)
        return 2
    after = asyncio.run(_with_engine(settings, current_revision))
    print(f"database is at revision {after}")
    if after == before and revision != "head":
        # Alembic only upgrades: a revision the database has already passed changes nothing.
        print(f"unchanged: migrate only upgrades, and the database is not behind revision {revision}")
    return 0


async def _upgrade(settings: Settings, revision: str) -> None:
    await _with_engine(settings, lambda engine: upgrade_database(engine, revision))


async def _with_engine(settings: Settings, action: Callable[..., Awaitable[T]]) -> T:
    engine = create_engine(settings.effective_database_url)
    try:
        return await action(engine)
    finally:
        await engine.dispose()


def _run_in_transaction(settings: Settings, action: Callable[[AsyncSession], Awaitable[int]]) -> int:
    async def run() -> int:
        database = Database(create_engine(settings.effective_database_url))
        try:
            await upgrade_database(database.engine)
            async with database.transaction() as session:
                return await action(session)
        finally:
            await database.dispose()

    return asyncio.run(run())


async def _create_invite(session: AsyncSession, max_uses: int, expires_in_days: float | None, code: str | None) -> int:
    from pocketllm.referrals import service as referrals

    if max_uses < 1:
        raise InvalidInput("--max-uses must be at least 1")
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidInput("--expires-in-days must be greater than 0")
    if code is not None and not 5 <= len(code.strip()) <= 64:
        raise InvalidInput("--code must be 5 to 64 characters long")
    if code is not None and await referrals.get_invite_code(session, code) is not None:
        raise InvalidInput(f"invite code {referrals.normalize_code(code)} already exists")

    invite = await referrals.create_invite_code(session, max_uses=max_uses, expires_in_days=expires_in_days, code=code)
    print(invite.code)
    return 0


async def _list_invites(session: AsyncSession) -> int:
    from pocketllm.referrals import service as referrals

    invites = await referrals.list_invite_codes(session)
    if not invites:
        print("no invite codes; create one with `pocketllm invites create`")
        return 0
    print(f"{'CODE':<20} {'STATUS':<10} {'USES':>9}  {'EXPIRES (UTC)':<20} CREATED (UTC)")
    for invite in invites:
        expires = invite.expires_at.strftime("%Y-%m-%d %H:%M") if invite.expires_at else "never"
        uses = f"{invite.uses_count}/{invite.max_uses}"
        status = referrals.invite_code_status(invite)
        print(f"{invite.code:<20} {status:<10} {uses:>9}  {expires:<20} {invite.created_at:%Y-%m-%d %H:%M}")
    return 0


async def _approve(session: AsyncSession, raw_email: str) -> int:
    from pocketllm.auth.emails import canonicalize_email
    from pocketllm.referrals import service as referrals

    email = canonicalize_email(raw_email)
    _, created = await referrals.approve_application(session, email)
    action = "created an approved application for" if created else "approved the application of"
    print(f"{action} {email}; this address can now sign up without an invite code")
    return 0


async def _reject(session: AsyncSession, raw_email: str) -> int:
    from pocketllm.auth.emails import canonicalize_email
    from pocketllm.referrals import service as referrals

    email = canonicalize_email(raw_email)
    try:
        await referrals.reject_application(session, email)
    except referrals.WaitlistApplicationNotFound:
        raise InvalidInput(f"no waitlist application for {email}; see `pocketllm waitlist list`") from None
    print(f"rejected the application of {email}; this address needs an invite code to sign up")
    return 0


async def _list_applications(session: AsyncSession, status: str | None) -> int:
    from pocketllm.referrals import service as referrals

    applications = await referrals.list_applications(session, status)
    if not applications:
        print(f"no {status} waitlist applications" if status else "no waitlist applications")
        return 0
    print(f"{'EMAIL':<40} {'STATUS':<9} {'APPLIED (UTC)':<17} {'SOURCE':<12} NAME")
    for application in applications:
        print(
            f"{application.email:<40} {application.status:<9} {application.created_at:%Y-%m-%d %H:%M} "
            f"{application.source or '-':<12} {application.full_name or '-'}"
        )
    return 0


async def _purge_deleted(settings: Settings) -> int:
    from pocketllm.storage.service import build_storage
    from pocketllm.users.service import purge_deleted_accounts

    database = Database(create_engine(settings.effective_database_url))
    try:
        await upgrade_database(database.engine)
        purged = await purge_deleted_accounts(database, build_storage(settings))
    finally:
        await database.dispose()
    print(f"purged {purged} account(s) whose deletion date has passed")
    return 0


async def _rotate_keys(session: AsyncSession, settings: Settings) -> int:
    from sqlalchemy import select

    from pocketllm.kit.crypto import SecretBox, SecretDecryptionFailed
    from pocketllm.models import ProviderConfig

    secrets = SecretBox(settings.encryption_keys)
    configs = await session.scalars(
        select(ProviderConfig).where(ProviderConfig.api_key_encrypted.is_not(None)).with_for_update()
    )
    rotated = unreadable = 0
    for config in configs:
        assert config.api_key_encrypted is not None
        try:
            config.api_key_encrypted = secrets.rotate(config.api_key_encrypted)
            rotated += 1
        except SecretDecryptionFailed:
            unreadable += 1
            print(
                f"pocketllm: the {config.provider} key of user {config.user_id} cannot be decrypted with any "
                "ENCRYPTION_KEY entry; it was left as it is",
                file=sys.stderr,
            )
    await session.flush()
    print(f"re-encrypted {rotated} provider key(s) under the primary ENCRYPTION_KEY")
    return 1 if unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
