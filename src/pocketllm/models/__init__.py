"""All ORM tables, imported here so that Alembic and the relationship registry see every one."""

from pocketllm.models.chat import Chat, StoredMessage
from pocketllm.models.invite import InviteCode
from pocketllm.models.job import Job
from pocketllm.models.mail import OutgoingMail
from pocketllm.models.model_config import ModelConfig
from pocketllm.models.profile import Profile
from pocketllm.models.provider import ProviderConfig
from pocketllm.models.referral import Referral
from pocketllm.models.session import AuthSession, RefreshToken
from pocketllm.models.user import User
from pocketllm.models.waitlist import WaitlistApplication

__all__ = [
    "AuthSession",
    "Chat",
    "InviteCode",
    "Job",
    "ModelConfig",
    "OutgoingMail",
    "Profile",
    "ProviderConfig",
    "Referral",
    "RefreshToken",
    "StoredMessage",
    "User",
    "WaitlistApplication",
]
