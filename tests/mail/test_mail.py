"""The mail outbox and its sender, against a real SMTP server (aiosmtpd) on 127.0.0.1.

Every database test runs on SQLite and PostgreSQL. The server runs in its own thread, as aiosmtpd's
Controller does, so the sender under test talks to it over a real socket.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from sqlalchemy import func, select, update

import pocketllm.models.mail  # noqa: F401  (puts mail_outbox on the metadata, so conftest empties it)
from pocketllm.auth.emails import InvalidEmail
from pocketllm.config import ConfigurationError
from pocketllm.db.engine import Database, create_engine
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput
from pocketllm.kit.logging import configure_logging
from pocketllm.mail import MailSender, enqueue_mail, parse_smtp_url, render_referral_invite
from pocketllm.mail.sender import INTERRUPTED_ERROR, MAX_RETRY_DELAY_SECONDS, SmtpTarget, retry_delay
from pocketllm.models.mail import MailStatus, OutgoingMail

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

MAIL_FROM = "PocketLLM <no-reply@pocketllm.test>"
RECIPIENT = "friend@example.com"
SMTP_USER = "ada@example.com"
SMTP_PASSWORD = "p@ss:w/rd-Secret-42"
# The URL form of SMTP_USER and SMTP_PASSWORD, percent-encoded as SMTP_URL requires.
SMTP_CREDENTIALS = "ada%40example.com:p%40ss%3Aw%2Frd-Secret-42"


# The SMTP server


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that keeps every message it accepts, or rejects them all with `reply`."""

    reply: str = "250 Message accepted for delivery"
    data_delay_seconds: float = 0.0
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str | None, list[str]]] = field(default_factory=list)
    data_commands: int = 0
    data_started: threading.Event = field(default_factory=threading.Event)
    accepted: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        self.data_started.set()
        if self.data_delay_seconds:
            await asyncio.sleep(self.data_delay_seconds)
        if self.reply.startswith("250"):
            raw = envelope.original_content or b""
            self.messages.append(email.message_from_bytes(raw, policy=email.policy.default))
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.accepted.set()
        return self.reply


@dataclass
class SmtpServer:
    handler: RecordingHandler
    port: int
    credentials: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServerFactory:
    """Starts SMTP servers on 127.0.0.1 and stops them all when the test ends."""

    controllers: list[Controller] = field(default_factory=list)

    def start(
        self,
        handler: RecordingHandler | None = None,
        *,
        port: int | None = None,
        accepted_password: str | None = None,
    ) -> SmtpServer:
        server = SmtpServer(handler=handler or RecordingHandler(), port=port or free_port())
        options: dict[str, Any] = {}
        if accepted_password is not None:

            def authenticate(
                smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
            ) -> AuthResult:
                assert isinstance(auth_data, LoginPassword)
                login, password = auth_data.login.decode(), auth_data.password.decode()
                server.credentials.append((login, password))
                return AuthResult(success=password == accepted_password, handled=False)

            # Plain-text AUTH is fine on loopback. Outside tests, an SMTP_URL with credentials requires
            # STARTTLS unless it sets starttls=false.
            options = {"authenticator": authenticate, "auth_required": True, "auth_require_tls": False}
        controller = Controller(
            server.handler, hostname="127.0.0.1", port=server.port, server_hostname="smtp.test", **options
        )
        controller.start()
        self.controllers.append(controller)
        return server

    def stop_all(self) -> None:
        for controller in self.controllers:
            controller.stop()
        self.controllers.clear()


@pytest.fixture
def smtp_servers() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    factory.stop_all()


@pytest.fixture
def smtp_server(smtp_servers: ServerFactory) -> SmtpServer:
    return smtp_servers.start()


# The sender and its settings


@dataclass
class MailTestSettings:
    """The mail settings that MailSender reads, without the rest of the application's settings."""

    smtp_url: str | None = None
    mail_from: str = MAIL_FROM
    mail_max_attempts: int = 8
    mail_retry_base_seconds: float = 30.0
    smtp_timeout_seconds: float = 5.0


def make_sender(database: Database, **settings: Any) -> MailSender:
    return MailSender(database, MailTestSettings(**settings))


async def enqueue(database: Database, *, subject: str = "Hello", html_body: str | None = "<p>Hello</p>") -> uuid.UUID:
    async with database.transaction() as session:
        return await enqueue_mail(session, to=RECIPIENT, subject=subject, text_body="Hello", html_body=html_body)


async def load(database: Database, mail_id: uuid.UUID) -> OutgoingMail:
    async with database.read_only() as session:
        mail = await session.get(OutgoingMail, mail_id)
    assert mail is not None
    return mail


async def count_mail(database: Database) -> int:
    async with database.read_only() as session:
        return int(await session.scalar(select(func.count()).select_from(OutgoingMail)) or 0)


# Enqueue


async def test_enqueue_stores_pending(database: Database) -> None:
    mail_id = await enqueue(database)

    mail = await load(database, mail_id)
    assert mail.status == MailStatus.PENDING
    assert mail.attempts == 0
    assert mail.to_address == RECIPIENT
    assert mail.sent_at is None
    assert mail.last_error is None
    assert mail.next_attempt_at <= utcnow()


class BusinessRuleFailed(Exception):
    pass


async def enqueue_then_fail(database: Database) -> None:
    async with database.transaction() as session:
        await enqueue_mail(session, to=RECIPIENT, subject="Never sent", text_body="Hello")
        raise BusinessRuleFailed


async def test_enqueue_rolled_back_with_transaction(database: Database) -> None:
    with pytest.raises(BusinessRuleFailed):
        await enqueue_then_fail(database)

    assert await count_mail(database) == 0


async def test_enqueue_canonicalizes_address(database: Database) -> None:
    async with database.transaction() as session:
        mail_id = await enqueue_mail(session, to="  Friend@Example.COM ", subject="Hi", text_body="Hello")

    mail = await load(database, mail_id)
    assert mail.to_address == "friend@example.com"


async def test_enqueue_rejects_invalid_address(database: Database) -> None:
    with pytest.raises(InvalidEmail):
        async with database.transaction() as session:
            await enqueue_mail(session, to="not an address", subject="Hi", text_body="Hello")


@pytest.mark.parametrize(
    ("subject", "text_body", "html_body", "message"),
    [
        ("Hi\r\nBcc: victim@example.com", "Hello", None, "line break"),
        ("Hi\u2028there", "Hello", None, "line break"),
        ("   ", "Hello", None, "subject is empty"),
        ("x" * 501, "Hello", None, "longer than 500"),
        ("Hi", " \n ", None, "text body is empty"),
        ("Hi", "Hello", "", "HTML body is empty"),
    ],
)
async def test_enqueue_rejects_invalid_parts(
    database: Database, subject: str, text_body: str, html_body: str | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        async with database.transaction() as session:
            await enqueue_mail(session, to=RECIPIENT, subject=subject, text_body=text_body, html_body=html_body)

    assert await count_mail(database) == 0


# Delivery over SMTP


async def test_deliver_sends_referral_invite(database: Database, smtp_server: SmtpServer) -> None:
    invite = render_referral_invite(
        inviter_name="Ada <Lovelace> & Co",
        invite_link="https://pocketllm.test/invite?code=ABCD-1234&ref=ada",
        invite_code="ABCD-1234",
        personal_message="Try this!\n<script>alert('x')</script>",
    )
    async with database.transaction() as session:
        mail_id = await enqueue_mail(
            session, to=RECIPIENT, subject=invite.subject, text_body=invite.text_body, html_body=invite.html_body
        )
    sender = make_sender(database, smtp_url=smtp_server.url)

    report = await sender.deliver_due()

    assert report.sent == 1
    assert report.retry_scheduled == 0
    assert report.failed == 0
    assert len(smtp_server.handler.messages) == 1
    message = smtp_server.handler.messages[0]
    assert message["From"] == MAIL_FROM
    assert message["To"] == RECIPIENT
    assert message["Subject"] == "Ada <Lovelace> & Co invited you to PocketLLM"
    assert message["Message-ID"] == f"<{mail_id}@pocketllm.test>"
    assert message.get_content_type() == "multipart/alternative"
    assert smtp_server.handler.envelopes == [("no-reply@pocketllm.test", [RECIPIENT])]

    text_part = message.get_body(("plain",))
    assert text_part is not None
    text = text_part.get_content()
    assert "> <script>alert('x')</script>" in text
    assert "https://pocketllm.test/invite?code=ABCD-1234&ref=ada" in text
    assert "ABCD-1234" in text

    html_part = message.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "Ada &lt;Lovelace&gt; &amp; Co invited you" in html
    assert 'href="https://pocketllm.test/invite?code=ABCD-1234&amp;ref=ada"' in html

    mail = await load(database, mail_id)
    assert mail.status == MailStatus.SENT
    assert mail.attempts == 1
    assert mail.sent_at is not None


async def test_deliver_plain_text_only(database: Database, smtp_server: SmtpServer) -> None:
    await enqueue(database, html_body=None)

    await make_sender(database, smtp_url=smtp_server.url).deliver_due()

    assert len(smtp_server.handler.messages) == 1
    message = smtp_server.handler.messages[0]
    assert message.get_content_type() == "text/plain"
    assert message.get_content().strip() == "Hello"


async def test_deliver_nothing_due(database: Database, smtp_server: SmtpServer) -> None:
    report = await make_sender(database, smtp_url=smtp_server.url).deliver_due()

    assert report.processed == 0
    assert smtp_server.handler.data_commands == 0


async def test_deliver_respects_limit(database: Database, smtp_server: SmtpServer) -> None:
    for index in range(3):
        await enqueue(database, subject=f"Message {index}")
    sender = make_sender(database, smtp_url=smtp_server.url)

    first = await sender.deliver_due(limit=2)
    second = await sender.deliver_due(limit=2)

    assert first.sent == 2
    assert second.sent == 1
    subjects = [message["Subject"] for message in smtp_server.handler.messages]
    assert subjects == ["Message 0", "Message 1", "Message 2"]


async def test_deliver_sends_decoded_credentials(database: Database, smtp_servers: ServerFactory) -> None:
    server = smtp_servers.start(accepted_password=SMTP_PASSWORD)
    await enqueue(database)
    url = f"smtp://{SMTP_CREDENTIALS}@127.0.0.1:{server.port}?starttls=false"

    report = await make_sender(database, smtp_url=url).deliver_due()

    assert report.sent == 1
    assert server.credentials == [(SMTP_USER, SMTP_PASSWORD)]
    assert len(server.handler.messages) == 1


async def test_auth_failure_hides_password(
    database: Database, smtp_servers: ServerFactory, caplog: pytest.LogCaptureFixture, structured_logs: None
) -> None:
    caplog.set_level(logging.DEBUG)
    server = smtp_servers.start(accepted_password="another-password")
    mail_id = await enqueue(database)
    url = f"smtp://{SMTP_CREDENTIALS}@127.0.0.1:{server.port}?starttls=false"

    report = await make_sender(database, smtp_url=url).deliver_due()

    assert report.retry_scheduled == 1
    mail = await load(database, mail_id)
    assert mail.last_error is not None
    assert "535" in mail.last_error
    assert SMTP_PASSWORD not in mail.last_error
    assert "mail.retry_scheduled" in caplog.text
    assert SMTP_PASSWORD not in caplog.text
    assert SMTP_CREDENTIALS not in caplog.text


# Logging instead of sending


@pytest.fixture
def structured_logs() -> None:
    """Route structlog through the standard library, where caplog captures it, as the app does at start."""
    configure_logging("DEBUG")


async def test_no_smtp_url_logs_and_marks_sent(
    database: Database, caplog: pytest.LogCaptureFixture, structured_logs: None
) -> None:
    caplog.set_level(logging.DEBUG)
    async with database.transaction() as session:
        mail_id = await enqueue_mail(
            session,
            to=RECIPIENT,
            subject="Ada invited you to PocketLLM",
            text_body="Your invite code is SECRET-CODE-123",
            html_body="<p>Your invite code is SECRET-CODE-123</p>",
        )

    report = await make_sender(database).deliver_due()

    # Only our own records: aiosqlite's DEBUG records quote every SQL parameter, the bodies included.
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("pocketllm."))
    assert report.sent == 1
    assert "mail.logged" in logged
    assert RECIPIENT in logged
    assert "Ada invited you to PocketLLM" in logged
    assert "SECRET-CODE-123" not in logged
    mail = await load(database, mail_id)
    assert mail.status == MailStatus.SENT
    assert mail.sent_at is not None


# Failures and retries


async def test_server_down_schedules_retry(database: Database) -> None:
    mail_id = await enqueue(database)
    sender = make_sender(database, smtp_url=f"smtp://127.0.0.1:{free_port()}")

    report = await sender.deliver_due()

    assert report.retry_scheduled == 1
    assert report.sent == 0
    mail = await load(database, mail_id)
    assert mail.status == MailStatus.PENDING
    assert mail.attempts == 1
    assert mail.next_attempt_at > utcnow()
    assert mail.last_error is not None
    assert "127.0.0.1" in mail.last_error


async def test_retry_after_outage_delivers_once(database: Database, smtp_servers: ServerFactory) -> None:
    port = free_port()
    mail_id = await enqueue(database)
    sender = make_sender(database, smtp_url=f"smtp://127.0.0.1:{port}")
    await sender.deliver_due()
    server = smtp_servers.start(port=port)

    too_early = await sender.deliver_due()
    after_backoff = await sender.deliver_due(now=utcnow() + timedelta(seconds=31))
    later = await sender.deliver_due(now=utcnow() + timedelta(hours=2))

    assert too_early.processed == 0
    assert after_backoff.sent == 1
    assert later.processed == 0
    assert len(server.handler.messages) == 1
    mail = await load(database, mail_id)
    assert mail.status == MailStatus.SENT
    assert mail.attempts == 2
    assert mail.last_error is not None


async def test_rejection_retried_then_failed(database: Database, smtp_servers: ServerFactory) -> None:
    server = smtp_servers.start(RecordingHandler(reply="550 5.7.1 Message rejected as spam"))
    mail_id = await enqueue(database)
    sender = make_sender(database, smtp_url=server.url, mail_max_attempts=3, mail_retry_base_seconds=30)
    first_at = utcnow()
    second_at = first_at + timedelta(seconds=30)
    third_at = second_at + timedelta(seconds=60)

    first = await sender.deliver_due(now=first_at)
    after_first = await load(database, mail_id)
    second = await sender.deliver_due(now=second_at)
    after_second = await load(database, mail_id)
    third = await sender.deliver_due(now=third_at)
    after_third = await load(database, mail_id)
    fourth = await sender.deliver_due(now=third_at + timedelta(days=1))

    assert first.retry_scheduled == 1
    assert after_first.status == MailStatus.PENDING
    assert after_first.attempts == 1
    assert after_first.next_attempt_at == first_at + timedelta(seconds=30)
    assert second.retry_scheduled == 1
    assert after_second.status == MailStatus.PENDING
    assert after_second.attempts == 2
    assert after_second.next_attempt_at == second_at + timedelta(seconds=60)
    assert third.failed == 1
    assert after_third.status == MailStatus.FAILED
    assert after_third.attempts == 3
    assert after_third.sent_at is None
    assert after_third.last_error is not None
    assert "550 5.7.1 Message rejected as spam" in after_third.last_error
    assert fourth.processed == 0
    assert server.handler.data_commands == 3
    assert server.handler.messages == []


async def test_silent_server_times_out(database: Database) -> None:
    # Accepts connections (through the backlog) but never sends the SMTP greeting.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mail_id = await enqueue(database)
        sender = make_sender(database, smtp_url=f"smtp://127.0.0.1:{port}", smtp_timeout_seconds=0.5)

        async with asyncio.timeout(10):
            report = await sender.deliver_due()

    assert report.retry_scheduled == 1
    mail = await load(database, mail_id)
    assert mail.last_error is not None
    assert "timed out" in mail.last_error.lower()


async def test_interrupted_last_attempt_fails(database: Database, smtp_server: SmtpServer) -> None:
    # A sender that stopped during the last attempt leaves the message pending, leased and out of attempts.
    mail_id = await enqueue(database)
    async with database.transaction() as session:
        await session.execute(
            update(OutgoingMail)
            .where(OutgoingMail.id == mail_id)
            .values(attempts=3, next_attempt_at=utcnow() + timedelta(seconds=90))
        )
    sender = make_sender(database, smtp_url=smtp_server.url, mail_max_attempts=3)

    while_leased = await sender.deliver_due()
    after_lease = await sender.deliver_due(now=utcnow() + timedelta(minutes=5))

    assert while_leased.processed == 0
    assert after_lease.failed == 1
    mail = await load(database, mail_id)
    assert mail.status == MailStatus.FAILED
    assert mail.last_error == INTERRUPTED_ERROR
    assert smtp_server.handler.data_commands == 0


def test_retry_delay_doubles_up_to_cap() -> None:
    delays = [retry_delay(attempts, 30).total_seconds() for attempts in range(1, 10)]

    assert delays == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert retry_delay(10_000, 30).total_seconds() == MAX_RETRY_DELAY_SECONDS


# Several senders


async def test_concurrent_senders_send_each_once(
    database: Database, database_url: str, smtp_server: SmtpServer
) -> None:
    count = 20
    for index in range(count):
        await enqueue(database, subject=f"Message {index}")
    other_process = Database(create_engine(database_url))
    try:
        senders = [
            make_sender(database, smtp_url=smtp_server.url),
            make_sender(other_process, smtp_url=smtp_server.url),
        ]

        reports = await asyncio.gather(*(sender.deliver_due() for sender in senders))
    finally:
        await other_process.dispose()

    assert sum(report.sent for report in reports) == count
    subjects = sorted(message["Subject"] for message in smtp_server.handler.messages)
    assert subjects == sorted(f"Message {index}" for index in range(count))
    assert smtp_server.handler.data_commands == count


async def test_leased_message_not_claimed_again(database: Database, smtp_servers: ServerFactory) -> None:
    server = smtp_servers.start(RecordingHandler(data_delay_seconds=1.0))
    mail_id = await enqueue(database)
    first = make_sender(database, smtp_url=server.url)
    second = make_sender(database, smtp_url=server.url)

    sending = asyncio.create_task(first.deliver_due())
    assert await asyncio.to_thread(server.handler.data_started.wait, 10)
    while_sending = await second.deliver_due()
    first_report = await sending

    assert while_sending.processed == 0
    assert first_report.sent == 1
    assert len(server.handler.messages) == 1
    mail = await load(database, mail_id)
    assert mail.status == MailStatus.SENT


async def test_run_delivers_until_stopped(database: Database, smtp_server: SmtpServer) -> None:
    sender = make_sender(database, smtp_url=smtp_server.url)
    stop = asyncio.Event()
    loop = asyncio.create_task(sender.run(stop, interval_seconds=0.05))

    mail_id = await enqueue(database)
    assert await asyncio.to_thread(smtp_server.handler.accepted.wait, 10)
    stop.set()
    async with asyncio.timeout(10):
        await loop

    mail = await load(database, mail_id)
    assert mail.status == MailStatus.SENT
    assert len(smtp_server.handler.messages) == 1


# SMTP_URL and MAIL_FROM


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpTarget("mail.example.com", 25)),
        ("smtp://mail.example.com:2525", SmtpTarget("mail.example.com", 2525)),
        ("smtp://mail.example.com?starttls=true", SmtpTarget("mail.example.com", 587, start_tls=True)),
        ("smtp://mail.example.com:25?starttls=false", SmtpTarget("mail.example.com", 25, start_tls=False)),
        ("smtps://mail.example.com", SmtpTarget("mail.example.com", 465, use_tls=True, start_tls=False)),
        ("SMTP://[::1]:2525/", SmtpTarget("::1", 2525)),
        (
            f"smtp://{SMTP_CREDENTIALS}@mail.example.com",
            SmtpTarget("mail.example.com", 587, SMTP_USER, SMTP_PASSWORD, start_tls=True),
        ),
        (
            f"smtp://{SMTP_CREDENTIALS}@mail.example.com:25?starttls=false",
            SmtpTarget("mail.example.com", 25, SMTP_USER, SMTP_PASSWORD, start_tls=False),
        ),
        (
            f"smtps://{SMTP_CREDENTIALS}@mail.example.com",
            SmtpTarget("mail.example.com", 465, SMTP_USER, SMTP_PASSWORD, use_tls=True, start_tls=False),
        ),
    ],
)
def test_parse_smtp_url(url: str, expected: SmtpTarget) -> None:
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://{SMTP_CREDENTIALS}@mail.example.com", "must start with smtp://"),
        (f"smtp://{SMTP_CREDENTIALS}@:25", "no host name"),
        (f"smtp://{SMTP_CREDENTIALS}@mail.example.com:port", "invalid port"),
        (f"smtp://{SMTP_CREDENTIALS}@mail.example.com/relay", "must not have a path"),
        (f"smtp://{SMTP_CREDENTIALS}@mail.example.com?tls=1", "unknown parameters"),
        (f"smtp://{SMTP_CREDENTIALS}@mail.example.com?starttls=maybe", "invalid starttls"),
        (f"smtps://{SMTP_CREDENTIALS}@mail.example.com?starttls=true", "cannot ask for starttls=true"),
    ],
)
def test_parse_smtp_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        parse_smtp_url(url)

    assert "p@ss" not in str(raised.value)
    assert SMTP_CREDENTIALS not in str(raised.value)


def test_smtp_target_repr_hides_password() -> None:
    target = parse_smtp_url(f"smtp://{SMTP_CREDENTIALS}@mail.example.com")

    assert SMTP_PASSWORD not in repr(target)
    assert target.address == "smtp://mail.example.com:587"


@pytest.mark.parametrize("mail_from", ["", "PocketLLM", "PocketLLM <no-reply>", "<@example.com>"])
def test_sender_rejects_invalid_mail_from(mail_from: str) -> None:
    with pytest.raises(ConfigurationError, match="MAIL_FROM"):
        MailSender(Database(create_engine("sqlite+aiosqlite:///:memory:")), MailTestSettings(mail_from=mail_from))


# Templates


def test_referral_invite_without_message() -> None:
    invite = render_referral_invite(inviter_name="Ada", invite_link="https://pocketllm.test/i/ABCD", invite_code="ABCD")

    assert invite.subject == "Ada invited you to PocketLLM"
    assert "wrote" not in invite.text_body
    assert "<blockquote>" not in invite.html_body
    assert "https://pocketllm.test/i/ABCD" in invite.text_body


def test_referral_invite_name_kept_on_one_line() -> None:
    invite = render_referral_invite(
        inviter_name="Ada\r\nBcc: victim@example.com " + "x" * 100,
        invite_link="https://pocketllm.test/i/ABCD",
        invite_code="ABCD",
    )

    assert "\n" not in invite.subject
    assert "\r" not in invite.subject
    assert invite.subject.startswith("Ada Bcc: victim@example.com")
    assert invite.subject.endswith("… invited you to PocketLLM")
    assert len(invite.subject) == 60 + len(" invited you to PocketLLM")


def test_referral_invite_blank_name() -> None:
    invite = render_referral_invite(inviter_name=" \n ", invite_link="https://pocketllm.test/i/A", invite_code="A")

    assert invite.subject == "Someone invited you to PocketLLM"


def test_referral_invite_message_line_breaks() -> None:
    invite = render_referral_invite(
        inviter_name="Ada",
        invite_link="https://pocketllm.test/i/ABCD",
        invite_code="ABCD",
        personal_message="First line\nSecond & last",
    )

    assert "> First line\n> Second & last\n" in invite.text_body
    assert "<blockquote>First line<br>\nSecond &amp; last</blockquote>" in invite.html_body


@pytest.mark.parametrize("link", ["javascript:alert(1)", "/relative/path", "ftp://pocketllm.test/i/A"])
def test_referral_invite_rejects_link(link: str) -> None:
    with pytest.raises(ValueError, match="invite_link"):
        render_referral_invite(inviter_name="Ada", invite_link=link, invite_code="A")
