from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime, utcnow
from pocketllm.models.mixins import UuidPrimaryKey

MAX_ADDRESS_LENGTH = 320
MAX_SUBJECT_LENGTH = 500
MAX_ERROR_LENGTH = 1000


class MailStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class OutgoingMail(UuidPrimaryKey, Base):
    """An e-mail in the outbox, written in the transaction of the change that causes it.

    The sender delivers pending rows whose `next_attempt_at` has passed. While a sender works on a row,
    `next_attempt_at` is its lease, so a sender that crashes leaves the row to be claimed again later.
    """

    __tablename__ = "mail_outbox"
    __table_args__ = (
        # Serves the due-message query: status = 'pending' AND next_attempt_at <= now, oldest first.
        Index("ix_mail_outbox_status_next_attempt_at", "status", "next_attempt_at"),
        CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status_known"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )

    to_address: Mapped[str] = mapped_column(String(MAX_ADDRESS_LENGTH))
    subject: Mapped[str] = mapped_column(String(MAX_SUBJECT_LENGTH))
    text_body: Mapped[str] = mapped_column(Text)
    # None sends a plain-text message, and a value makes the message multipart/alternative.
    html_body: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=MailStatus.PENDING.value)
    # Counted when a sender claims the message, so an attempt that crashed the sender counts too.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The latest failure, readable and free of credentials. It is kept after a later attempt succeeds.
    last_error: Mapped[str | None] = mapped_column(String(MAX_ERROR_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
