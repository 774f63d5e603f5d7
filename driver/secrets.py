"""One place that hides secrets in text the driver shows: :func:`mask`.

Every error message, log line, JSON record and manifest passes through :func:`mask`, which replaces

* every secret the process knows: the value of each live :class:`~charforge.driver.config.Secret`
  (tokens, passwords, header values, the RunPod API key - from arguments, the environment or a profile), the
  secret environment variables themselves (``CHARFORGE_TOKEN``, ``CHARFORGE_PASSWORD``, ``RUNPOD_API_KEY``,
  the values of ``CHARFORGE_HEADERS``) and any extra strings the caller passes;
* the password of ``user:password@`` in URLs, ``Authorization:`` header values, long ``Bearer`` tokens and
  the values of URL query parameters that carry credentials (``?token=``, ``&api_key=``, S3 signatures ...),
  known or not (ordinary words such as "basic" or ``key=`` in a prompt are left alone);

by ``***``, *then* cuts the text to ``limit`` characters. Masking first matters: a token that straddles the
cut would otherwise leave a prefix that no longer matches and is shown.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

MASK = "***"

#: every live Secret of this process (see config.Secret): a secret is masked for as long as it is in use
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()

#: environment variables whose values are secrets wherever they appear
SECRET_ENV_VARS = ("CHARFORGE_TOKEN", "CHARFORGE_PASSWORD", "RUNPOD_API_KEY")

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@:]*):([^/\s@]*)@")
# Only where credentials are unmistakable: ordinary text ("a basic pose", "key=light" in a prompt) is kept.
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?)[^\s\"',;]+")
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]{16,}")
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:access_token|token|auth|api[_-]?key|apikey|key|password|passwd|pwd|secret|"
    r"signature|sig|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s\"'#]+"
)
#: secrets shorter than this are not searched for (masking every "a" would make text unreadable)
_MIN_SECRET = 3


def remember(secret: Any) -> None:
    """Register a ``Secret`` (anything with ``reveal()``) so that :func:`mask` hides its value while it lives."""
    _LIVE.add(secret)


def environment_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values found in the environment (``CHARFORGE_TOKEN`` ..., header values)."""
    env = os.environ if env is None else env
    found = [env[name] for name in SECRET_ENV_VARS if env.get(name)]
    raw = env.get("CHARFORGE_HEADERS")
    if raw:
        try:
            headers = json.loads(raw)
        except ValueError:
            headers = None
        if isinstance(headers, dict):
            found += [str(v) for v in headers.values() if v]
    return found


def mask(text: object, secrets: Iterable[str] = (), *, limit: int | None = None) -> str:
    """``text`` with every known secret replaced by ``***``, then cut to ``limit`` characters (with "...").

    ``secrets`` adds strings to the known ones (their URL-quoted forms are masked too).
    """
    out = text if isinstance(text, str) else str(text)
    known = [s.reveal() for s in list(_LIVE)]
    values = {s for s in (*secrets, *known, *environment_secrets()) if s and len(s) >= _MIN_SECRET}
    for secret in sorted(values, key=len, reverse=True):
        if secret in out:
            out = out.replace(secret, MASK)
        quoted = quote(secret, safe="")
        if quoted != secret and quoted in out:
            out = out.replace(quoted, MASK)
    out = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{MASK}@", out)
    out = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, out)
    out = _BEARER.sub(lambda m: m.group(1) + MASK, out)
    out = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, out)
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 3)].rstrip() + "..."
    return out


def mask_data(data: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of JSON-like ``data`` with every string masked (before encoding: a secret with quotes or
    backslashes no longer matches once JSON has escaped them)."""
    secrets = list(secrets)
    if isinstance(data, str):
        return mask(data, secrets)
    if isinstance(data, dict):
        return {mask(str(k), secrets): mask_data(v, secrets) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [mask_data(v, secrets) for v in data]
    return data


def mask_body(body: bytes, secrets: Iterable[str] = (), *, limit: int = 300) -> str:
    """A server's reply body as one masked, bounded line of text for an error message."""
    # Decode well past the limit so that a secret crossing the limit is still whole when it is masked; a body
    # longer than that window loses the window's last 1 KiB, where a secret cut by the window would start.
    window = limit * 4 + 4096
    text = body[:window].decode("utf-8", "replace")
    if len(body) > window:
        text = text[:-1024]
    return mask(" ".join(text.split()), secrets, limit=limit)
