"""Credentials never leave the process: not to MLflow, not to the terminal, not to a log.

A storage or tracking URL is rendered by SQLAlchemy's URL parser with its password hidden; a
password in its query string (`?password=...`, libpq's `sslpassword`) and one given as libpq's
`password=...` keyword are hidden too, and so are the values of the environment's secrets
(HF_TOKEN, ...). A password that holds an unescaped `@` (`u:p@ss@host`) is hidden up to the
last `@` before the host: SQLAlchemy alone would end it at the first and show `u:***@ss@host`.
"""

from __future__ import annotations

import os
import re

HIDDEN = "***"
# Environment variables whose values are credentials (the Hub's token, MLflow's and libpq's passwords).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "PGPASSWORD")
# A URL in running text: its last character is no punctuation of the sentence around it.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>:,;.)]")
_KEYWORD_PASSWORD = re.compile(r"((?:^|[?&;\s,(])(?:ssl)?(?:password|passwd|pwd)=)[^&\s'\",)]*", re.IGNORECASE)


def _userinfo_split(url: str) -> tuple[str, str, str] | None:
    """(scheme://user, password, @host...) when the URL carries a password, else None."""
    scheme, _, rest = url.partition("://")
    authority_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, authority_end)
    if at < 0 or ":" not in rest[:at]:
        return None
    user, password = rest[:at].split(":", 1)
    return f"{scheme}://{user}", password, rest[at:]


def redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    parts = _userinfo_split(url)
    if parts is not None:
        from urllib.parse import quote
        head, password, tail = parts
        try:  # quoted, the password is one field for the parser, whatever characters it holds
            url = make_url(f"{head}:{quote(password, safe='')}{tail}").render_as_string(hide_password=True)
        except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: hide what lies between : and @
            url = f"{head}:{HIDDEN}{tail}"
    return _KEYWORD_PASSWORD.sub(rf"\g<1>{HIDDEN}", url)


def redact(text: str) -> str:
    """`text` with every URL's password, every `password=` value and every secret of the
    environment hidden."""
    text = _KEYWORD_PASSWORD.sub(rf"\g<1>{HIDDEN}", _URL.sub(lambda m: redact_url(m.group(0)), text))
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a shorter value would hide ordinary words
            text = text.replace(value, HIDDEN)
    return text
