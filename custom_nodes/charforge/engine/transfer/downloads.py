"""Model files fetched by the server itself from a URL: resumed with HTTP Range, verified by size and sha256
before they appear in the model folder under their name.

A Hugging Face token (gated or private files) is sent as ``Authorization: Bearer`` to the hub only
(:func:`~...common.transfer.is_hf_url`), never along a redirect to another host: the hub sends large files
on to its CDN with a signed URL that needs no token.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ...common.transfer import is_hf_url, sha256_file

Progress = Callable[[int, int | None], None]


class DownloadFailed(Exception):
    """The file could not be fetched or is not the one the manifest describes."""


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects; the token goes along only to another address of the hub."""

    def __init__(self, token: str) -> None:
        self.token = token

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.token and is_hf_url(newurl):
            new.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return new


def _refused(exc: urllib.error.HTTPError, url: str, token: str) -> str:
    if exc.code in (401, 403) and is_hf_url(url):
        return f"HTTP {exc.code} from the Hugging Face hub: the file is gated or private" + (
            " and the token was not accepted (is access to the model granted to its account?)"
            if token
            else "; accept its terms on huggingface.co and set HF_TOKEN on the server, or in the "
            "driver's environment (it is sent with the download request)"
        )
    if exc.code in (401, 403):
        return f"HTTP {exc.code}: the host wants credentials; only Hugging Face tokens are sent"
    return f"HTTP {exc.code} {exc.reason}"


def download_file(
    url: str,
    target: str | os.PathLike,
    *,
    sha256: str = "",
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
    block: int = 1 << 20,
    headers: dict[str, str] | None = None,
    token: str = "",
) -> str:
    """Download `url` into `target` and return its sha256.

    The bytes go into ``<target>.part`` first; a later call resumes from its length (``Range``), starting over
    when the server ignores the range. With `sha256` / `size` given, a file that does not match is refused
    (:class:`DownloadFailed`) and its partial copy removed, so a wrong file never lands in the model folder.
    `token` (a Hugging Face token) is sent only when `url` is on the hub; it never appears in a message.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadFailed(f"only http(s) URLs can be downloaded, not {url.split(':', 1)[0]}:")
    target = Path(target)
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if token and is_hf_url(url):
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_HubRedirects(token if is_hf_url(url) else ""))
    if have and (size is None or have < size):
        request.add_header("Range", f"bytes={have}-")
    if size is None or have < size:
        try:
            with opener.open(request, timeout=timeout) as response:
                if have and response.status != 206:
                    have = 0  # the server sent the whole file
                total = size
                length = response.headers.get("Content-Length")
                if total is None and length and length.isdigit():
                    total = have + int(length)
                with open(partial, "ab" if have else "wb") as handle:
                    done = have
                    while chunk := response.read(block):
                        handle.write(chunk)
                        done += len(chunk)
                        if size is not None and done > size:
                            break
                        if progress is not None:
                            progress(done, total)
        except urllib.error.HTTPError as exc:
            raise DownloadFailed(f"downloading {target.name}: {_refused(exc, url, token)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadFailed(
                f"downloading {target.name}: {getattr(exc, 'reason', None) or exc} "
                f"({partial.stat().st_size if partial.exists() else 0} bytes kept; "
                "start again to resume)"
            ) from None
    got = partial.stat().st_size
    if size is not None and got != size:
        partial.unlink(missing_ok=True)
        raise DownloadFailed(f"{target.name}: got {got} bytes, the manifest says {size}")
    digest = sha256_file(partial)
    if sha256 and digest != sha256.lower():
        partial.unlink(missing_ok=True)
        raise DownloadFailed(
            f"{target.name}: sha256 {digest} is not the manifest's {sha256}; the file was removed"
        )
    os.replace(partial, target)
    return digest
