"""Outgoing mail, written to an outbox in the caller's transaction and delivered later."""

from pocketllm.mail.sender import DeliveryReport, MailSender, MailSettings, SmtpTarget, parse_smtp_url
from pocketllm.mail.service import enqueue_mail
from pocketllm.mail.templates import RenderedMail, render_referral_invite

__all__ = [
    "DeliveryReport",
    "MailSender",
    "MailSettings",
    "RenderedMail",
    "SmtpTarget",
    "enqueue_mail",
    "parse_smtp_url",
    "render_referral_invite",
]
