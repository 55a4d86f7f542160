"""Guards against hostile input, in one place: the one error type for bad input, what may be
shown of a value (bounded, secrets redacted, no control characters), names that are safe to
print and to use as path parts, and bounded reads of files that may not be files.

Every message raypipe shows or saves passes through :func:`one_line` (errors, the run record's
error fields, the CLI's lines) or :func:`block` (tracebacks, the report's text), so a bad value
of any size costs a bounded prefix on screen and on disk, and a URI never shows its
credentials, wherever it comes from: a pipeline file, an override, ``--storage``, a library's
error message.

Standard library only: the CLI imports this before anything heavy.
"""

from __future__ import annotations

import errno
import os
import re
import select
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

#: A bad value quoted inside a message: enough to recognise it.
MAX_QUOTE_CHARS = 80
#: One line of output or one error field of the run record.
MAX_LINE_CHARS = 1000
#: A traceback in the run record or a block of text in the report.
MAX_BLOCK_CHARS = 20_000
#: What stands in for a secret.
REDACTED = "***"

# Names that are printed and used as path parts: matched whole (fullmatch), never up to a
# trailing newline as `$` would allow.
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
PIPELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
COMPONENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}(\.[A-Za-z][A-Za-z0-9_]{0,63}){0,4}")
CACHE_KEY = re.compile(r"[0-9a-f]{8,64}")


class InputError(ValueError):
    """Bad input (a file, an override, a run record, a storage location): the CLI prints it
    as one line, ``source: key: problem``, and exits 2. The message is bounded and redacted
    whatever the parts hold.

    Args:
        source: the file or location the input came from.
        key: the key path inside it (``stages.train.with.lr``), if there is one.
        problem: what is wrong, and what was expected.
    """

    def __init__(self, source: str, key: str | None, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = clip(redact(str(source)), 300)
        if key:
            where += f": {clip(redact(str(key)), 200)}"
        super().__init__(one_line(f"{where}: {problem}"))


# --- bounded text ----------------------------------------------------------------------------


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit:,} more characters]"


def quote(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """A bad value as a message quotes it: its ``repr``, redacted, at most ``limit``
    characters of it (redacted first: a cut never leaves half a secret in view)."""
    text = repr(redact(value)) if isinstance(value, str) else redact(repr(value))
    return clip(text, limit)


# Control characters (C0, DEL, C1) and the bidirectional overrides that make text read
# differently from what it holds. Shown escaped, so a value cannot redraw the terminal,
# break a line or reorder what follows.
_BIDI = r"\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_CONTROL_BUT_LINES = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _escape(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


_SURROGATE = re.compile("[\ud800-\udfff]")


def not_unicode(text: str) -> str:
    """Why ``text`` is not valid Unicode (a lone surrogate, such as a JSON ``"\\ud800"``
    escape gives: no encoder or tokenizer takes it), or "" when it is."""
    bad = _SURROGATE.search(text)
    if bad is None:
        return ""
    code = ord(bad.group())
    return f"not valid Unicode: a lone surrogate U+{code:04X} at character {bad.start()}"


def one_line(text: Any, limit: int = MAX_LINE_CHARS) -> str:
    """What may be shown of ``text`` on one line: secrets redacted, control characters
    (newlines too) escaped, at most ``limit`` characters."""
    text = redact(str(text))
    return clip(_CONTROL.sub(_escape, _ANSI.sub("", text)), limit)


def block(text: Any, limit: int = MAX_BLOCK_CHARS) -> str:
    """What may be shown of a multi-line ``text`` (a traceback): secrets redacted, control
    characters but newlines and tabs escaped; when longer than ``limit``, its first quarter
    and its last three quarters (where a traceback says what went wrong) are kept."""
    text = redact(str(text))
    if not text.isprintable():  # every character either pattern matches is unprintable
        text = _CONTROL_BUT_LINES.sub(_escape, _ANSI.sub("", text))
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    return f"{text[:head]}\n... [{len(text) - limit:,} characters left out] ...\n{text[-tail:]}"


# --- secrets in URIs -------------------------------------------------------------------------

# Query (or fragment) parameters whose values are credentials: secret_key, access_key,
# session_token, token, password, sig (signed URLs), X-Amz-Credential, api_key ...
_SECRET_PARAM = re.compile(r"secret|token|passw|pwd|key|sig|credential|auth|session", re.I)
_PARAM = re.compile(r"([?&;#])([^=&;#]*)=([^&;#]*)")
_URI = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,30}://[^\s'\"<>`]*")
# Secrets seen in URIs this process was given (--storage, a pipeline's storage or tracking):
# also redacted where a library repeats them outside a URI, decoded or not.
_known: set[str] = set()
MIN_SECRET_CHARS = 4


def _split_credentials(rest: str) -> tuple[str, str]:
    """(userinfo, the rest) of the part of a URI after ``scheme://`` (userinfo empty if none).

    The authority ends at the first ``/``; an unencoded ``/`` inside a secret (AWS secret keys
    hold them) would end it early, so ``user:se/cret@host`` counts as userinfo up to the first
    ``@`` when the authority holds a ``:`` and an ``@`` follows before any ``?`` or ``#``.
    """
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head = rest[:cut]
    authority = head.split("/", 1)[0]
    if "@" in authority:
        at = authority.rfind("@")
    elif ":" in authority and "@" in head:
        at = head.find("@")
    else:
        return "", rest
    return rest[:at], rest[at:]


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo and the values of credential-like query parameters replaced
    by ``***``; anything without ``scheme://`` is returned as it is."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    userinfo, rest = _split_credentials(rest)
    if userinfo:
        rest = REDACTED + rest
    rest = _PARAM.sub(
        lambda m: f"{m[1]}{m[2]}={REDACTED if _SECRET_PARAM.search(unquote(m[2])) else m[3]}",
        rest,
    )
    return f"{scheme}://{rest}"


def remember_secrets(uri: str | None) -> None:
    """Notes the credentials in ``uri`` so :func:`redact` hides them anywhere, even where a
    library repeats them outside the URI."""
    if not uri or "://" not in uri:
        return
    userinfo, rest = _split_credentials(uri.partition("://")[2])
    found = userinfo.split(":") if userinfo else []
    found += [m[3] for m in _PARAM.finditer(rest) if _SECRET_PARAM.search(unquote(m[2]))]
    for secret in found:
        for form in (secret, unquote(secret)):
            if len(form) >= MIN_SECRET_CHARS:
                _known.add(form)


def redact(text: str) -> str:
    """``text`` with every URI in it redacted (:func:`redact_uri`) and every remembered secret
    replaced by ``***``."""
    if "://" in text:
        text = _URI.sub(lambda m: redact_uri(m.group()), text)
    for secret in _known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_data(value: Any) -> Any:
    """``value`` (plain data: dicts, lists, scalars) with :func:`redact` applied to every
    string in it, keys included: a config as a record or a report may keep it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(v) for v in value]
    return value


# --- storage locations -----------------------------------------------------------------------

#: Schemes of the pyarrow.fs filesystems a storage URI may name; anything else is refused when
#: a pipeline file is validated or a store is opened, not when a run first writes.
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def storage_problem(storage: str) -> str | None:
    """Why ``storage`` cannot name a storage root (None when it can), from its text alone;
    whether it can be written is checked when a run starts (``Store.check_writable``)."""
    if not storage.strip():
        return "storage is empty; give a path (./runs) or a URI (s3://bucket/prefix)"
    if not storage.isprintable():
        return "storage holds control characters"
    scheme, sep, _ = storage.partition("://")
    if sep and scheme.lower() not in STORAGE_SCHEMES:
        known = ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
        return f"unknown storage scheme {quote(scheme)}; a local path or one of {known}"
    return None


# --- bounded reads ---------------------------------------------------------------------------


class TooLarge(ValueError):
    """A file holds more than the bytes it may; ``size`` is known for regular files."""

    def __init__(self, limit: int, size: int | None):
        self.limit, self.size = limit, size
        held = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
        super().__init__(f"holds {held}; at most {limit:,} are read")


def read_bounded(path: str | Path, limit: int, wait_s: float = 5.0) -> bytes:
    """Reads at most ``limit`` bytes of a file that may not be a regular file.

    A FIFO without a writer reads as empty instead of blocking the open; a device that never
    ends (``/dev/zero``) stops at ``limit``; a terminal or a pipe that gives nothing for
    ``wait_s`` seconds is given up on.

    Raises:
        TooLarge: more than ``limit`` bytes.
        IsADirectoryError, FileNotFoundError, OSError: as ``open`` and ``read`` raise them.
        TimeoutError: nothing more came for ``wait_s`` seconds.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise TooLarge(limit, info.st_size)
        chunks: list[bytes] = []
        total = 0
        deadline = time.monotonic() + wait_s
        while total <= limit:
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing to read for {wait_s:g} s") from None
                select.select([fd], [], [], left)
                continue
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise TooLarge(limit, None)
        return b"".join(chunks)
    finally:
        os.close(fd)
