"""Secrets out of everything cnnpipe prints, logs, tags or writes: URIs with passwords and tokens masked.

A concern of its own (not MLflow's): stage error lines, Optuna storage URLs, MLflow params and tags all use it.
"""

from __future__ import annotations

import re
from urllib.parse import quote_plus, unquote_plus

# Secrets in URIs. The masking over-approximates what any consumer may read as a password rather than trusting
# one parser: SQLAlchemy's URL pattern takes the password up to the *first* `@` (raw `/ : ? #` allowed), urllib
# takes the userinfo up to the *last* `@` of a netloc that ends at the first `/`. A password holding a raw `@` or `/`
# has no single right reading, and masking by either reading alone leaks part of it (make_url("u:p@ss@h") has
# password "p" and host "ss@h"). Here the userinfo is everything between `scheme://` and the last `@` before the
# query (`?`) or fragment (`#`), or SQLAlchemy's first `@` if that comes later (not for http URLs): whichever
# parser the URI meets, its password lies inside what is masked.
# Query parameters whose name says secret (`?password=`, `&sslpassword=`, `&token=`, ...) are masked, and so are the
# `PWD=` / `Password=` pairs of an ODBC connection string in a query value (mssql's `odbc_connect=`), percent-encoded
# or not. Every URI inside a longer text (a message, a traceback, a repr, a YAML dump) is masked where it stands;
# the text around it, and text holding no URI, is left exactly as it is.
MASK = "***"
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_SPACE = re.compile(r"\s")
_SQLALCHEMY_USERINFO = re.compile(r"[^:/]*:[^@]*@")  # sqlalchemy.engine.url's pattern: user, `:`, password to the `@`
_HTTP_USERINFO = re.compile(r"[^:/]*:[^@/]*@")  # the same, but no `/`: `host:5000/path?mail=a@b` is not userinfo
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|api[_-]?key|signature|^sig$|credential|^auth", re.IGNORECASE)
_ODBC_QUERY = re.compile(r"(?i)[?&]odbc_connect=")
_ODBC_PAIR = re.compile(r"(?i)(?:pwd|password)\s*(?:=|%3D)")
_ODBC_SECRET = re.compile(r"(?i)\b(pwd|password)(\s*=\s*)(\{(?:[^}]|\}\})*\}?|[^;]*)")
_CLOSING = "'\"()<>[]{},;"  # punctuation closing a quoted or bracketed URI, not part of its last value


def mask_secrets(text: str) -> str:
    """Every URI in `text` with its password, secret query values and ODBC `PWD=` masked, for anything printed,
    logged, tagged or written: `postgresql://user:p%2Fw@host/db?sslpassword=x` -> `postgresql://user:***@host/db?
    sslpassword=***`. Text without `scheme://` comes back unchanged."""
    text = str(text)
    starts = [m.start() for m in _URI_START.finditer(text)]
    if not starts:
        return text
    out, pos = [], 0
    for i, start in enumerate(starts):
        if start < pos:
            continue
        limit = starts[i + 1] if i + 1 < len(starts) else len(text)
        space = _SPACE.search(text, start, limit)
        end = space.start() if space else limit
        if len(starts) == 1 and start == 0 and "\n" not in text:
            end = len(text)  # the whole text is one URI (a setting's value): its password may hold a raw space
        if _ODBC_QUERY.search(text, start, end):  # an ODBC string may hold spaces: it runs to the end of the line
            newline = text.find("\n", end, limit)
            end = limit if newline < 0 else newline
        out += [text[pos:start], _mask_uri(text[start:end])]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _mask_uri(uri: str) -> str:
    head = uri.index("://") + 3
    rest = uri[head:]
    query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query)
    http = uri.lower().startswith(("http:", "https:"))
    first = (_HTTP_USERINFO if http else _SQLALCHEMY_USERINFO).match(rest)
    if first:  # a password with a raw `?` or `#`, as SQLAlchemy reads it (and any http client)
        at = max(at, first.end() - 1)
    if at >= 0 and ":" in rest[:at]:
        user = rest[: rest.index(":")]
        masked = f"{user}:{MASK}"
        rest, query = masked + rest[at:], query - at + len(masked)
    if query < len(rest) and rest[query] == "?":
        fragment = rest.find("#", query)
        fragment = len(rest) if fragment < 0 else fragment
        rest = rest[: query + 1] + _mask_query(rest[query + 1 : fragment]) + rest[fragment:]
    return uri[:head] + rest


def _mask_query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        core = value.rstrip(_CLOSING)
        closing = value[len(core) :]
        if eq and core and _SECRET_KEY.search(unquote_plus(key)):
            part = f"{key}={MASK}{closing}"
        elif eq and _ODBC_PAIR.search(value):
            odbc = _ODBC_SECRET.sub(rf"\1\2{MASK}", unquote_plus(value))
            part = f"{key}={quote_plus(odbc, safe='={};*')}"
        parts.append(part)
    return "&".join(parts)
