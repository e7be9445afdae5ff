"""E-mail bodies as plain text and HTML. Every value that a user typed is escaped in the HTML part."""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

APP_NAME = "PocketLLM"
# Longer inviter names are cut in the subject line, so a name cannot pose as a whole subject.
MAX_NAME_IN_SUBJECT = 60
FALLBACK_INVITER_NAME = "Someone"


@dataclass(frozen=True)
class RenderedMail:
    """The parts of an e-mail that `enqueue_mail` takes, apart from the recipient."""

    subject: str
    text_body: str
    html_body: str


def render_referral_invite(
    *, inviter_name: str, invite_link: str, invite_code: str, personal_message: str | None = None
) -> RenderedMail:
    """Render the e-mail that invites someone to sign up with the inviter's code.

    `invite_link` must be an absolute http(s) URL; anything else raises ValueError, because the link is
    put into an href attribute. The personal message keeps its line breaks in both parts.
    """
    _check_link(invite_link)
    name = single_line(inviter_name) or FALLBACK_INVITER_NAME
    message = (personal_message or "").strip()

    subject = f"{shorten(name, MAX_NAME_IN_SUBJECT)} invited you to {APP_NAME}"

    text_lines = [f"{name} invited you to join {APP_NAME}.", ""]
    if message:
        text_lines += [f"{name} wrote:", *(f"> {line}" for line in message.splitlines()), ""]
    text_lines += [
        f"Accept the invite: {invite_link}",
        "",
        f"Or enter this invite code when you sign up: {invite_code}",
        "",
        "If you did not expect this invite, you can ignore this e-mail.",
    ]

    html_parts = [f"<p>{html.escape(name)} invited you to join {APP_NAME}.</p>"]
    if message:
        html_parts.append(f"<p>{html.escape(name)} wrote:</p>")
        html_parts.append(f"<blockquote>{text_to_html(message)}</blockquote>")
    html_parts += [
        f'<p><a href="{html.escape(invite_link, quote=True)}">Accept the invite</a></p>',
        f"<p>Or enter this invite code when you sign up: <strong>{html.escape(invite_code)}</strong></p>",
        "<p>If you did not expect this invite, you can ignore this e-mail.</p>",
    ]

    return RenderedMail(
        subject=subject,
        text_body="\n".join(text_lines) + "\n",
        html_body=html_document(subject, "\n".join(html_parts)),
    )


def html_document(title: str, body_html: str) -> str:
    """Wrap HTML that is already escaped in a complete document. `title` is plain text and gets escaped."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        '<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n"
        '<body style="font-family: sans-serif; line-height: 1.5">\n'
        f"{body_html}\n"
        "</body>\n"
        "</html>\n"
    )


def text_to_html(text: str) -> str:
    """Escape plain text for HTML and keep its line breaks as <br>."""
    return "<br>\n".join(html.escape(line) for line in text.splitlines())


def single_line(text: str) -> str:
    """Replace control characters and line breaks with spaces and collapse runs of whitespace."""
    cleaned = "".join(" " if unicodedata.category(character) in {"Cc", "Zl", "Zp"} else character for character in text)
    return " ".join(cleaned.split())


def shorten(text: str, max_length: int) -> str:
    """Cut `text` to at most `max_length` characters, ending with an ellipsis when cut."""
    if len(text) <= max_length:
        return text
    return text[: max_length - 1].rstrip() + "…"


def _check_link(link: str) -> None:
    parts = urlsplit(link)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("invite_link must be an absolute http:// or https:// URL")
