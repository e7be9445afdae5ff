"""Delivery of the outbox over SMTP, with retries and exponential backoff.

Each message is claimed in a short transaction that counts the attempt and moves `next_attempt_at`
forward as a lease. The message is then sent with no transaction open, and the result is stored in a
second short transaction. A sender that crashes mid-send leaves the message to be claimed again when
the lease ends, so delivery is at least once: a crash after the SMTP server accepted a message but
before the result was stored sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Literal, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

import aiosmtplib
import structlog
from sqlalchemy import ColumnElement, func, select, update

from pocketllm.config import ConfigurationError
from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.models.mail import MAX_ERROR_LENGTH, MailStatus, OutgoingMail

log = structlog.get_logger(__name__)

# Retry delays double from MAIL_RETRY_BASE_SECONDS up to this cap.
MAX_RETRY_DELAY_SECONDS = 3600.0
# Added to the SMTP timeout to give the lease time for storing the result after the send.
LEASE_MARGIN_SECONDS = 60.0
# `run` checks its stop event between messages, and takes at most this many before it sleeps again.
RUN_BATCH_SIZE = 50
INTERRUPTED_ERROR = "The last attempt was interrupted before its result was stored, and no attempts are left."
_TRUE_VALUES = frozenset({"true", "1", "yes", "on"})
_FALSE_VALUES = frozenset({"false", "0", "no", "off"})


# Configuration


class MailSettings(Protocol):
    """The settings that the sender reads; `pocketllm.config.Settings` provides them."""

    @property
    def smtp_url(self) -> str | None: ...

    @property
    def mail_from(self) -> str: ...

    @property
    def mail_max_attempts(self) -> int: ...

    @property
    def mail_retry_base_seconds(self) -> float: ...

    @property
    def smtp_timeout_seconds(self) -> float: ...


@dataclass(frozen=True)
class SmtpTarget:
    """Connection details of the SMTP server, parsed from SMTP_URL."""

    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # Implicit TLS from the first byte (smtps://, usually port 465).
    use_tls: bool = False
    # True requires STARTTLS, False never sends it, None upgrades when the server offers it.
    start_tls: bool | None = None

    @property
    def address(self) -> str:
        """The server for logs and error messages, without credentials."""
        scheme = "smtps" if self.use_tls else "smtp"
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{scheme}://{host}:{self.port}"


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse `smtp://user:password@host:port?starttls=true` or `smtps://...` into an SmtpTarget.

    The user name and password are percent-decoded, so `@`, `:` and `/` in them must be written as
    `%40`, `%3A` and `%2F`. With credentials and no `starttls` parameter, `smtp://` requires STARTTLS, so
    a password is never sent in clear text unless the URL sets `starttls=false`. Raises
    ConfigurationError, whose message never contains the password.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in {"smtp", "smtps"}:
        raise ConfigurationError(
            "SMTP_URL must start with smtp:// (plain or STARTTLS) or smtps:// (TLS from the start)."
        )
    if not parts.hostname:
        raise ConfigurationError("SMTP_URL has no host name. Use smtp://host:port.")
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError("SMTP_URL has an invalid port. Use a number from 1 to 65535.") from None
    if parts.path not in {"", "/"} or parts.fragment:
        raise ConfigurationError("SMTP_URL must not have a path or a fragment. Use smtp://host:port?starttls=true.")

    start_tls = _parse_query(parts.query)
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    use_tls = scheme == "smtps"
    if use_tls:
        if start_tls:
            raise ConfigurationError("SMTP_URL cannot ask for starttls=true with smtps://, which uses TLS already.")
        start_tls = False
    elif start_tls is None and username is not None:
        start_tls = True

    if port is None and use_tls:
        port = 465
    elif port is None and start_tls:
        port = 587
    elif port is None:
        port = 25
    return SmtpTarget(
        hostname=parts.hostname,
        port=port,
        username=username,
        password=password,
        use_tls=use_tls,
        start_tls=start_tls,
    )


def _parse_query(query: str) -> bool | None:
    """Return the `starttls` parameter of SMTP_URL, or None when it is absent."""
    parameters = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parameters) - {"starttls"})
    if unknown:
        raise ConfigurationError(f"SMTP_URL has unknown parameters {unknown}. The only parameter is starttls.")
    values = parameters.get("starttls")
    if not values:
        return None
    value = values[-1].strip().lower()
    if value in _TRUE_VALUES:
        return True
    if value in _FALSE_VALUES:
        return False
    raise ConfigurationError("SMTP_URL has an invalid starttls value. Use starttls=true or starttls=false.")


def _sender_domain(mail_from: str) -> str:
    """Return the domain of MAIL_FROM, checking that it contains an address."""
    _, address = email.utils.parseaddr(mail_from)
    local_part, at, domain = address.rpartition("@")
    if not at or not local_part or not domain:
        raise ConfigurationError(
            f"MAIL_FROM is not a valid address: {mail_from!r}. Use e.g. 'PocketLLM <no-reply@example.com>'."
        )
    return domain


# Messages


@dataclass(frozen=True)
class _ClaimedMail:
    """A message taken from the outbox for one attempt, detached from any session."""

    id: uuid.UUID
    to_address: str
    subject: str
    text_body: str
    html_body: str | None
    created_at: datetime
    # The attempt count after this claim; the result is stored only if it is unchanged.
    attempts: int


def build_message(mail: _ClaimedMail, *, mail_from: str, domain: str) -> EmailMessage:
    """Build the MIME message: text/plain alone, or multipart/alternative with an HTML part.

    The Message-ID comes from the outbox id, so a message sent again after a crash carries the same id
    both times and receivers can drop the copy.
    """
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = mail.to_address
    message["Subject"] = mail.subject
    message["Date"] = email.utils.format_datetime(mail.created_at)
    message["Message-ID"] = f"<{mail.id}@{domain}>"
    message.set_content(mail.text_body)
    if mail.html_body is not None:
        message.add_alternative(mail.html_body, subtype="html")
    return message


def describe_error(error: BaseException, *, secrets: tuple[str, ...] = (), timeout_seconds: float = 0) -> str:
    """Return a readable one-line description of a failed send, with every secret replaced by ***."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        refusals = "; ".join(f"{refused.recipient}: {refused.code} {refused.message}" for refused in error.recipients)
        text = f"The SMTP server refused the recipient ({refusals})."
    elif isinstance(error, aiosmtplib.SMTPResponseException):
        text = f"The SMTP server replied {error.code} {error.message} ({type(error).__name__})."
    elif isinstance(error, TimeoutError) and not str(error):
        text = f"Sending timed out after {timeout_seconds:g} seconds."
    else:
        text = f"{type(error).__name__}: {error}"

    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


def retry_delay(attempts: int, base_seconds: float) -> timedelta:
    """Return the wait after failed attempt number `attempts`: base, twice the base, four times, ... up to one hour."""
    exponent = min(max(attempts - 1, 0), 32)
    return timedelta(seconds=min(base_seconds * 2**exponent, MAX_RETRY_DELAY_SECONDS))


# Delivery


@dataclass(frozen=True)
class DeliveryReport:
    """Counts of the outcomes of one `deliver_due` call."""

    sent: int = 0
    retry_scheduled: int = 0
    failed: int = 0

    @property
    def processed(self) -> int:
        return self.sent + self.retry_scheduled + self.failed


class MailSender:
    """Delivers due outbox messages over SMTP, or writes them to the log when SMTP_URL is not set.

    Several senders, in one process or many, may run against the same database: on PostgreSQL each claim
    skips rows that another sender has locked, and on SQLite claims are write transactions, which the
    engine serializes with BEGIN IMMEDIATE. Every failure is retried until MAIL_MAX_ATTEMPTS, permanent
    rejections included, because a relay that is set up wrong (missing credentials, say) rejects valid
    mail with 5xx codes too.
    """

    def __init__(self, database: Database, settings: MailSettings) -> None:
        if settings.mail_max_attempts < 1:
            raise ConfigurationError("MAIL_MAX_ATTEMPTS must be at least 1.")
        if settings.mail_retry_base_seconds <= 0:
            raise ConfigurationError("MAIL_RETRY_BASE_SECONDS must be greater than 0.")
        if settings.smtp_timeout_seconds <= 0:
            raise ConfigurationError("SMTP_TIMEOUT_SECONDS must be greater than 0.")

        self._database = database
        self._target = parse_smtp_url(settings.smtp_url) if settings.smtp_url else None
        self._mail_from = settings.mail_from
        self._domain = _sender_domain(settings.mail_from)
        self._max_attempts = settings.mail_max_attempts
        self._retry_base_seconds = settings.mail_retry_base_seconds
        self._timeout_seconds = settings.smtp_timeout_seconds
        self._lease = timedelta(seconds=self._timeout_seconds + LEASE_MARGIN_SECONDS)
        self._secrets = self._secret_forms()

    @property
    def target(self) -> SmtpTarget | None:
        """The SMTP server, or None when messages are only logged."""
        return self._target

    async def deliver_due(self, *, now: datetime | None = None, limit: int = 50) -> DeliveryReport:
        """Send up to `limit` messages whose next attempt is due at `now` (default: the current time).

        Each message is claimed, sent and its result stored before the next one is claimed. A failed
        send schedules a retry, or marks the message failed after MAIL_MAX_ATTEMPTS attempts.
        """
        return await self._deliver(now=now, limit=limit, stop=None)

    async def run(self, stop: asyncio.Event, *, interval_seconds: float = 5.0) -> None:
        """Deliver due messages until `stop` is set, checking the outbox every `interval_seconds`.

        Errors outside a single send, such as a database outage, are logged and the loop goes on. Setting
        `stop` ends the loop after the message being sent. Cancelling the task ends it at once, and the
        interrupted message is retried when its lease ends.
        """
        transport = self._target.address if self._target else "log"
        log.info("mail.sender_started", transport=transport, max_attempts=self._max_attempts)
        consecutive_failures = 0
        while not stop.is_set():
            report = DeliveryReport()
            try:
                report = await self._deliver(now=None, limit=RUN_BATCH_SIZE, stop=stop)
                consecutive_failures = 0
            except Exception:  # logged, and retried on the next round, so one outage does not stop delivery
                consecutive_failures += 1
                log.exception("mail.delivery_round_failed", consecutive_failures=consecutive_failures)

            # A full batch means more messages may be due already.
            if report.processed >= RUN_BATCH_SIZE:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        log.info("mail.sender_stopped")

    async def _deliver(self, *, now: datetime | None, limit: int, stop: asyncio.Event | None) -> DeliveryReport:
        if now is not None and now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        sent = retry_scheduled = 0
        failed = await self._fail_exhausted(now or utcnow())

        for _ in range(limit - failed):
            if stop is not None and stop.is_set():
                break
            mail = await self._claim_next(now or utcnow())
            if mail is None:
                break
            error = await self._send(mail)
            if error is None:
                if await self._record_sent(mail, now or utcnow()):
                    sent += 1
                continue
            outcome = await self._record_failure(mail, error, now or utcnow())
            if outcome == "failed":
                failed += 1
            elif outcome == "retry_scheduled":
                retry_scheduled += 1

        return DeliveryReport(sent=sent, retry_scheduled=retry_scheduled, failed=failed)

    async def _fail_exhausted(self, now: datetime) -> int:
        """Mark failed the due messages that have no attempts left, and return how many there were.

        Such a message is pending only when a sender stopped during its last attempt (its lease has
        ended), or when MAIL_MAX_ATTEMPTS was lowered since its last attempt.
        """
        statement = (
            update(OutgoingMail)
            .where(
                OutgoingMail.status == MailStatus.PENDING.value,
                OutgoingMail.attempts >= self._max_attempts,
                OutgoingMail.next_attempt_at <= now,
            )
            .values(
                status=MailStatus.FAILED.value, last_error=func.coalesce(OutgoingMail.last_error, INTERRUPTED_ERROR)
            )
            .returning(OutgoingMail.id, OutgoingMail.attempts, OutgoingMail.last_error)
        )
        async with self._database.transaction() as session:
            rows = (await session.execute(statement)).all()
        for mail_id, attempts, last_error in rows:
            log.error("mail.failed", mail_id=str(mail_id), attempts=attempts, error=last_error)
        return len(rows)

    async def _claim_next(self, now: datetime) -> _ClaimedMail | None:
        """Take the oldest due message, count the attempt and lease it, in one short transaction."""
        query = (
            select(OutgoingMail)
            .where(
                OutgoingMail.status == MailStatus.PENDING.value,
                OutgoingMail.attempts < self._max_attempts,
                OutgoingMail.next_attempt_at <= now,
            )
            .order_by(OutgoingMail.next_attempt_at, OutgoingMail.id)
            .limit(1)
            # PostgreSQL: a row claimed by another sender's open transaction is skipped, not waited for.
            # SQLite has no row locks and SQLAlchemy leaves the clause out there.
            .with_for_update(skip_locked=True)
        )
        async with self._database.transaction() as session:
            row = await session.scalar(query)
            if row is None:
                return None
            row.attempts += 1
            row.next_attempt_at = now + self._lease
            return _ClaimedMail(
                id=row.id,
                to_address=row.to_address,
                subject=row.subject,
                text_body=row.text_body,
                html_body=row.html_body,
                created_at=row.created_at,
                attempts=row.attempts,
            )

    async def _send(self, mail: _ClaimedMail) -> str | None:
        """Send one message; return None on success, or a description of the failure without secrets."""
        if self._target is None:
            # Only the recipient and subject are logged, because bodies carry invite codes and users' own words.
            log.info(
                "mail.logged", mail_id=str(mail.id), to=mail.to_address, subject=mail.subject, reason="no SMTP_URL"
            )
            return None

        target = self._target
        try:
            message = build_message(mail, mail_from=self._mail_from, domain=self._domain)
            async with asyncio.timeout(self._timeout_seconds):
                await aiosmtplib.send(
                    message,
                    hostname=target.hostname,
                    port=target.port,
                    username=target.username,
                    password=target.password,
                    use_tls=target.use_tls,
                    start_tls=target.start_tls,
                    timeout=self._timeout_seconds,
                )
        # SMTPException covers refusals and protocol errors, and OSError covers connection and TLS failures.
        # ValueError covers a message that cannot be encoded, such as a header that the email package rejects.
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as error:
            return describe_error(error, secrets=self._secrets, timeout_seconds=self._timeout_seconds)
        return None

    async def _record_sent(self, mail: _ClaimedMail, now: datetime) -> bool:
        statement = (
            update(OutgoingMail)
            .where(*self._still_claimed(mail))
            .values(status=MailStatus.SENT.value, sent_at=now)
            .returning(OutgoingMail.id)
        )
        async with self._database.transaction() as session:
            stored = (await session.execute(statement)).scalar_one_or_none()
        if stored is None:
            self._log_lease_lost(mail, outcome="sent")
            return False
        log.info("mail.sent", mail_id=str(mail.id), attempts=mail.attempts)
        return True

    async def _record_failure(
        self, mail: _ClaimedMail, error: str, now: datetime
    ) -> Literal["failed", "retry_scheduled", "lease_lost"]:
        """Store a failed attempt: schedule a retry, or mark the message failed after its last attempt."""
        final = mail.attempts >= self._max_attempts
        values: dict[str, object] = {"last_error": error}
        retry_at = now + retry_delay(mail.attempts, self._retry_base_seconds)
        if final:
            values["status"] = MailStatus.FAILED.value
        else:
            values["next_attempt_at"] = retry_at
        statement = update(OutgoingMail).where(*self._still_claimed(mail)).values(values).returning(OutgoingMail.id)
        async with self._database.transaction() as session:
            stored = (await session.execute(statement)).scalar_one_or_none()

        if stored is None:
            self._log_lease_lost(mail, outcome="failed attempt")
            return "lease_lost"
        if final:
            log.error("mail.failed", mail_id=str(mail.id), attempts=mail.attempts, error=error)
            return "failed"
        log.warning(
            "mail.retry_scheduled",
            mail_id=str(mail.id),
            attempts=mail.attempts,
            retry_at=retry_at.isoformat(),
            error=error,
        )
        return "retry_scheduled"

    @staticmethod
    def _still_claimed(mail: _ClaimedMail) -> tuple[ColumnElement[bool], ...]:
        """Conditions that hold only while no other sender has taken the message over."""
        return (
            OutgoingMail.id == mail.id,
            OutgoingMail.status == MailStatus.PENDING.value,
            OutgoingMail.attempts == mail.attempts,
        )

    @staticmethod
    def _log_lease_lost(mail: _ClaimedMail, *, outcome: str) -> None:
        # The lease ended before the result was stored and another sender claimed the message again.
        log.warning("mail.lease_lost", mail_id=str(mail.id), attempts=mail.attempts, outcome=outcome)

    def _secret_forms(self) -> tuple[str, ...]:
        """Return the SMTP password as given and percent-encoded, for scrubbing error messages."""
        password = self._target.password if self._target else None
        if not password:
            return ()
        return (password, quote(password, safe=""), quote(password))
