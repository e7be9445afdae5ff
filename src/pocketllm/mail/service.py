"""Writing e-mails to the outbox, inside the caller's transaction."""

from __future__ import annotations

import unicodedata
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.auth.emails import canonicalize_email
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput
from pocketllm.models.mail import MAX_SUBJECT_LENGTH, MailStatus, OutgoingMail

# Far above any template's output. It guards the table against a runaway caller.
MAX_BODY_LENGTH = 1_000_000
# Control characters and the Unicode line and paragraph separators.
_LINE_BREAKING_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


async def enqueue_mail(
    session: AsyncSession, *, to: str, subject: str, text_body: str, html_body: str | None = None
) -> uuid.UUID:
    """Add an e-mail to the outbox and return its id.

    The row is only flushed: it is committed or rolled back with the caller's transaction, so the
    message goes out exactly when the change that caused it is stored. The sender delivers it later.
    Raises InvalidInput (InvalidEmail for the address) for values that cannot be sent.
    """
    to_address = canonicalize_email(to)
    _check_subject(subject)
    _check_body("text body", text_body)
    if html_body is not None:
        _check_body("HTML body", html_body)

    mail = OutgoingMail(
        id=uuid.uuid4(),
        to_address=to_address,
        subject=subject,
        text_body=text_body,
        html_body=html_body,
        status=MailStatus.PENDING.value,
        attempts=0,
        next_attempt_at=utcnow(),
    )
    session.add(mail)
    await session.flush()
    return mail.id


def _check_subject(subject: str) -> None:
    if not subject.strip():
        raise InvalidInput("The e-mail subject is empty.")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidInput(f"The e-mail subject is longer than {MAX_SUBJECT_LENGTH} characters.")
    # A line break would end the Subject header and start another one.
    if any(unicodedata.category(character) in _LINE_BREAKING_CATEGORIES for character in subject):
        raise InvalidInput("The e-mail subject contains a line break or another control character.")


def _check_body(name: str, body: str) -> None:
    if not body.strip():
        raise InvalidInput(f"The e-mail {name} is empty.")
    if len(body) > MAX_BODY_LENGTH:
        raise InvalidInput(f"The e-mail {name} is longer than {MAX_BODY_LENGTH} characters.")
