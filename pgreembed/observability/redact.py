"""Keep secrets (DSN passwords, API keys) out of logs, errors and status output."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote

# postgresql://user:secret@host/db, redis://:secret@host:6379/0
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@",
                           re.IGNORECASE)
# password=secret in a libpq keyword DSN or a query string
_KEYWORD_PASSWORD = re.compile(r"(?P<key>\bpassword\s*=\s*)(?P<pw>'[^']*'|[^\s&]+)", re.IGNORECASE)
# OpenAI-style keys and bearer tokens
_API_KEY = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+[A-Za-z0-9_\-.]{6,})")

# The authority of a URL (user:password@host:port), up to the path, query or fragment.
_URL_AUTHORITY = re.compile(r"^[a-z][a-z0-9+.-]*://(?P<authority>[^/?#]*)", re.IGNORECASE)

_known_secrets: set[str] = set()


def register_secret(value: str | None, min_length: int = 4) -> None:
    """Remember a secret value so it is masked wherever it shows up verbatim."""
    if value and len(value) >= min_length:
        _known_secrets.add(value)


def url_password(url: str) -> str | None:
    """The password of a URL as written (percent-encoded or not), or of a keyword DSN.

    The user info ends at the *last* '@' before the host, as the user meant it;
    libpq splits at the first one, which is why its errors can show the rest.
    """
    match = _URL_AUTHORITY.match(url)
    if match is None:
        keyword = _KEYWORD_PASSWORD.search(url)
        return keyword["pw"].strip("'") if keyword else None
    userinfo, at, _ = match["authority"].rpartition("@")
    _, colon, password = userinfo.partition(":")
    return password if at and colon and password else None


def register_url_secrets(url: str | None) -> None:
    """Mask a DSN's password, decoded or not, and what libpq shows of one holding an '@'.

    libpq reads `user:Secret@Pw@host` as password "Secret" and host "Pw@host", and
    says "failed to resolve host 'Pw@host'": each tail after an '@' is masked too.
    """
    password = url_password(url or "")
    if not password:
        return
    register_secret(password)
    register_secret(unquote(password))
    for index, char in enumerate(password):
        if char == "@":
            register_secret(password[index + 1:] + "@", min_length=2)


def register_configured_secrets(urls: Iterable[str | None], keys: Iterable[str | None]) -> None:
    """Register the passwords of `urls` and the API `keys`; every process does at start-up,
    so a key of any shape is masked even where no provider was built."""
    for url in urls:
        register_url_secrets(url)
    for key in keys:
        register_secret(key)


def redact(text: str) -> str:
    """Mask passwords in URLs/DSNs, API keys and every registered secret."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _KEYWORD_PASSWORD.sub(lambda m: f"{m['key']}***", text)
    text = _API_KEY.sub("***", text)
    for secret in sorted(_known_secrets, key=len, reverse=True):  # longest first
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, so the handler cannot print the raw one.
            formatter = logging.Formatter()
            cleaned += "\n" + redact(formatter.formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root logger (call after logging setup)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
