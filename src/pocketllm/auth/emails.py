"""E-mail canonicalisation: the one form under which addresses are stored and compared."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

from pocketllm.errors import InvalidInput

MAX_EMAIL_LENGTH = 320


class InvalidEmail(InvalidInput):
    code = "invalid_email"


def canonicalize_email(raw: str) -> str:
    """Return the canonical form of an address: trimmed, lower-cased, with the domain in IDNA (ASCII) form.

    `Ada@Bücher.example ` and `ada@xn--bcher-kva.example` are the same account. The local part is
    lower-cased too, because users expect addresses to be case-insensitive even where RFC 5321 allows
    otherwise. Raises InvalidEmail for anything that is not a syntactically valid address.
    """
    candidate = raw.strip()
    if not candidate or len(candidate) > MAX_EMAIL_LENGTH:
        raise InvalidEmail("The e-mail address is missing or longer than 320 characters.")
    try:
        # No DNS look-up: deliverability is not ours to judge, and the server may run offline.
        validated = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as error:
        raise InvalidEmail(f"The e-mail address is not valid: {error}") from error

    domain = validated.ascii_domain or validated.domain
    return f"{validated.local_part.lower()}@{domain.lower()}"
