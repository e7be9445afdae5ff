from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class Referral(UuidPrimaryKey, Timestamps, Base):
    """One person that a user invited, by e-mail or by someone signing up with the user's personal code.

    There is one row per referrer and canonical e-mail address. The row stays when the referred account is
    deleted (`referred_user_id` becomes NULL), so a reward is recorded once per referred address even if
    that address signs up again. Deleting the referrer deletes their referrals.
    """

    __tablename__ = "referrals"
    __table_args__ = (
        UniqueConstraint("referrer_id", "email"),
        CheckConstraint("status IN ('pending', 'joined')", name="status_known"),
        CheckConstraint("reward_status IN ('none', 'pending', 'issued')", name="reward_status_known"),
    )

    referrer_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    # Canonical form (see auth.emails.canonicalize_email).
    email: Mapped[str] = mapped_column(String(320))
    full_name: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    # "pending" until someone with this address signs up with the referrer's code, then "joined".
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # "none" before the join; "pending" once a reward is owed to the referrer; "issued" once granted.
    reward_status: Mapped[str] = mapped_column(String(16), default="none")
    referred_user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    # When the invite e-mail was last put in the outbox; NULL for referrals that started with a sign-up.
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
