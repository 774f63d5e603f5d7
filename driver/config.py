"""Where the server is and how to authenticate: URLs, auth, environment variables and profiles.

(Over 600 lines on purpose: every server setting, ComfyUI's, RunPod's and Replicate's, is resolved here in the one
order below, from the same file and environment; split, the precedence rule would live in two places.)

Precedence, highest first: explicit arguments (``--server``, ``auth=``) > ``CHARFORGE_*`` environment
variables > the chosen profile of the config file (``$CHARFORGE_CONFIG`` or ``~/.config/charforge/config.yaml``).

Config file::

    default_profile: local
    profiles:
      local:
        server: http://127.0.0.1:8188
      studio:
        server: https://comfy.example.com/team/      # path prefixes and https/wss are fine
        token_env: STUDIO_COMFY_TOKEN                # bearer token read from this variable
      pod:
        server: https://abc-8188.proxy.runpod.net
        username: me
        password_env: POD_PASSWORD                   # basic auth
        headers: {X-Api-Key: "${POD_KEY}"}           # ${VAR} is expanded from the environment
        timeout: 1800                                # default job timeout (seconds) for this profile

Environment variables: ``CHARFORGE_SERVER``, ``CHARFORGE_PROFILE``, ``CHARFORGE_TOKEN``, ``CHARFORGE_USERNAME``
+ ``CHARFORGE_PASSWORD``, ``CHARFORGE_HEADERS`` (a JSON object of header names to values).

Secrets are kept in :class:`Secret` objects whose ``repr``/``str`` is ``***``; :func:`redact` removes them from
any text (error messages, logs, manifests).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from charforge.common import config_file
from charforge.common.safe_yaml import UnsafeYaml, load_yaml

from .errors import ConfigError
from .secrets import MASK, mask, remember

DEFAULT_SERVER = "http://127.0.0.1:8188"


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value", "__weakref__")

    def __init__(self, value: str) -> None:
        self._value = str(value)
        remember(self)  # so that secrets.mask hides it in any text, wherever it came from

    def reveal(self) -> str:
        """The real value (only for building request headers)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


class Auth:
    """Base class of the authentication schemes: produces request headers, knows its secrets."""

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """Raw secret strings, for redaction."""
        raise NotImplementedError


class BearerAuth(Auth):
    """``Authorization: Bearer <token>``."""

    def __init__(self, token: str | Secret) -> None:
        self.token = token if isinstance(token, Secret) else Secret(token)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.reveal()}"}

    def secrets(self) -> list[str]:
        return [self.token.reveal()]

    def __repr__(self) -> str:
        return f"BearerAuth(token={MASK!r})"


class BasicAuth(Auth):
    """HTTP basic auth (``Authorization: Basic base64(user:password)``)."""

    def __init__(self, username: str, password: str | Secret) -> None:
        self.username = username
        self.password = password if isinstance(password, Secret) else Secret(password)
        self._encoded = Secret(self.headers()["Authorization"].split(" ", 1)[1])  # masked like the password

    def headers(self) -> dict[str, str]:
        import base64

        raw = f"{self.username}:{self.password.reveal()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}

    def secrets(self) -> list[str]:
        return [self.password.reveal(), self.headers()["Authorization"].split(" ", 1)[1]]

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password={MASK!r})"


class HeaderAuth(Auth):
    """Custom headers (``X-Api-Key`` and the like); every value is treated as a secret."""

    def __init__(self, headers: Mapping[str, str | Secret]) -> None:
        self._headers = {k: v if isinstance(v, Secret) else Secret(v) for k, v in headers.items()}

    def headers(self) -> dict[str, str]:
        return {k: v.reveal() for k, v in self._headers.items()}

    def secrets(self) -> list[str]:
        return [v.reveal() for v in self._headers.values()]

    def __repr__(self) -> str:
        return f"HeaderAuth(headers={ {k: MASK for k in self._headers}!r})"


class MultiAuth(Auth):
    """Several schemes at once (e.g. basic auth for a proxy plus an API-key header)."""

    def __init__(self, parts: Iterable[Auth]) -> None:
        self.parts = list(parts)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.parts:
            out.update(part.headers())
        return out

    def secrets(self) -> list[str]:
        return [s for part in self.parts for s in part.secrets()]

    def __repr__(self) -> str:
        return f"MultiAuth({self.parts!r})"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret masked (see :func:`charforge.driver.secrets.mask`)."""
    return mask(text, secrets)


@dataclass(frozen=True)
class ServerURL:
    """A ComfyUI base URL: scheme, host and an optional path prefix (a reverse proxy's mount point)."""

    scheme: str
    netloc: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> tuple[ServerURL, BasicAuth | None]:
        """Parse ``url``; credentials in it (``https://user:pw@host``) are split off as basic auth.

        Accepts ``host:port`` without a scheme (http is assumed) and ``ws``/``wss`` schemes.
        """
        text = url.strip()
        if not text:
            raise ConfigError("empty server URL")
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
            parts.hostname, parts.port  # noqa: B018 - both raise ValueError on a malformed host or port
        except ValueError as exc:
            raise ConfigError(
                f"invalid server URL {mask(_strip_credentials(url))!r} ({exc}); write it like "
                "http://127.0.0.1:8188 or https://host/prefix/"
            ) from None
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
        if scheme not in ("http", "https"):
            raise ConfigError(
                f"unsupported URL scheme {parts.scheme!r} in server URL; use http:// or https://"
            )
        if not parts.hostname:
            raise ConfigError(f"no host in server URL {_strip_credentials(url)!r}")
        if parts.query or parts.fragment:
            raise ConfigError("the server URL must not contain a query string or fragment")
        auth = None
        if parts.username is not None:
            auth = BasicAuth(unquote(parts.username), unquote(parts.password or ""))
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"bad port in server URL: {exc}") from None
        netloc = f"{host}:{port}" if port else host
        prefix = parts.path.rstrip("/")
        return cls(scheme, netloc, prefix), auth

    @property
    def base(self) -> str:
        """``scheme://host[:port][/prefix]`` without a trailing slash."""
        return f"{self.scheme}://{self.netloc}{self.prefix}"

    def http(self, path: str) -> str:
        """Absolute URL of an API path such as ``/prompt``."""
        return self.base + "/" + path.lstrip("/")

    def ws(self, client_id: str) -> str:
        """The WebSocket URL for ``client_id`` (``ws://`` or ``wss://`` matching the HTTP scheme)."""
        scheme = "wss" if self.scheme == "https" else "ws"
        return urlunsplit((scheme, self.netloc, self.prefix + "/ws", f"clientId={quote(client_id)}", ""))

    def __str__(self) -> str:
        return self.base + "/"


def _strip_credentials(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


MB = 1024 * 1024
#: one downloaded output file (a long video can be large; an endless stream must still stop)
DEFAULT_MAX_DOWNLOAD_MB = 4096.0
#: one JSON reply (``/object_info`` of a big install is tens of MB) and one WebSocket message (a preview)
DEFAULT_MAX_REPLY_MB = 256.0
#: where each limit is set, for error messages: flag / environment variable / profile key
DOWNLOAD_LIMIT_SETTING = "--max-download-mb, $CHARFORGE_MAX_DOWNLOAD_MB or the profile's max_download_mb"
REPLY_LIMIT_SETTING = "$CHARFORGE_MAX_REPLY_MB or the profile's max_reply_mb"


@dataclass(frozen=True)
class Limits:
    """How much a server may send: one downloaded file, one JSON reply, one WebSocket message (bytes)."""

    max_download_bytes: int = int(DEFAULT_MAX_DOWNLOAD_MB * MB)
    max_reply_bytes: int = int(DEFAULT_MAX_REPLY_MB * MB)

    @classmethod
    def resolve(
        cls,
        settings: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        download_mb: float | None = None,
        reply_mb: float | None = None,
    ) -> Limits:
        """Arguments beat ``$CHARFORGE_MAX_DOWNLOAD_MB``/``$CHARFORGE_MAX_REPLY_MB``, which beat the profile's
        ``max_download_mb``/``max_reply_mb``; sizes are MiB (fractions allowed)."""
        env = os.environ if env is None else env
        settings = settings or {}

        def pick(arg: float | None, var: str, key: str, default: float) -> int:
            for value, where in (
                (arg, f"--{key.replace('_', '-')}"),
                (env.get(var), f"${var}"),
                (settings.get(key), f"the profile's {key}"),
            ):
                if value is None or value == "":
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = -1.0
                if not number > 0:
                    raise ConfigError(f"{where} must be a positive number of MiB, not {value!r}")
                return max(1, int(number * MB))
            return int(default * MB)

        return cls(
            pick(download_mb, "CHARFORGE_MAX_DOWNLOAD_MB", "max_download_mb", DEFAULT_MAX_DOWNLOAD_MB),
            pick(reply_mb, "CHARFORGE_MAX_REPLY_MB", "max_reply_mb", DEFAULT_MAX_REPLY_MB),
        )


def mib(size: int) -> str:
    """``size`` bytes as MiB for messages (``4096 MiB``, ``0.05 MiB``)."""
    return f"{size / MB:.4g} MiB"


@dataclass
class ServerConfig:
    """Everything needed to talk to one server. ``repr`` never shows secrets."""

    url: ServerURL
    auth: Auth | None = None
    profile: str | None = None
    job_timeout: float | None = None
    verify_tls: bool = True
    warnings: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)

    def secrets(self) -> list[str]:
        return self.auth.secrets() if self.auth else []

    def __repr__(self) -> str:
        return f"ServerConfig(url={str(self.url)!r}, auth={self.auth!r}, profile={self.profile!r})"


def load_config_file(path: Path) -> dict[str, Any]:
    """Read the YAML config file; a missing file is an empty config."""
    if not path.exists():
        return {}
    import yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8"), "the file") or {}
    except (OSError, UnsafeYaml, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, env: Mapping[str, str], where: str) -> Any:
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(f"{where} refers to ${{{name}}}, but that environment variable is not set")
        return env[name]

    return _VAR.sub(sub, value)


def _from_env_var(key: str, name: Any, env: Mapping[str, str], where: str) -> str:
    if not isinstance(name, str) or name not in env:
        raise ConfigError(f"{where}: {key} names environment variable {name!r}, which is not set")
    return env[name]


def _profile_auth(profile: Mapping[str, Any], env: Mapping[str, str], where: str) -> list[Auth]:
    parts: list[Auth] = []
    token = profile.get("token")
    if "token_env" in profile:
        token = _from_env_var("token_env", profile["token_env"], env, where)
    if token:
        parts.append(BearerAuth(_expand(token, env, where)))
    username = profile.get("username")
    password = profile.get("password")
    if "password_env" in profile:
        password = _from_env_var("password_env", profile["password_env"], env, where)
    if username is not None:
        parts.append(BasicAuth(str(_expand(username, env, where)), str(_expand(password or "", env, where))))
    headers: dict[str, str] = {}
    raw_headers = profile.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise ConfigError(f"{where}: headers must be a mapping of header names to values")
    for name, value in raw_headers.items():
        headers[str(name)] = str(_expand(value, env, where))
    raw_env_headers = profile.get("headers_env") or {}
    if not isinstance(raw_env_headers, Mapping):
        raise ConfigError(f"{where}: headers_env must map header names to environment variable names")
    for name, var in raw_env_headers.items():
        headers[str(name)] = _from_env_var(f"headers_env.{name}", var, env, where)
    if headers:
        parts.append(HeaderAuth(headers))
    return parts


def _env_auth(env: Mapping[str, str]) -> list[Auth]:
    parts: list[Auth] = []
    if env.get("CHARFORGE_TOKEN"):
        parts.append(BearerAuth(env["CHARFORGE_TOKEN"]))
    if env.get("CHARFORGE_USERNAME"):
        parts.append(BasicAuth(env["CHARFORGE_USERNAME"], env.get("CHARFORGE_PASSWORD", "")))
    if env.get("CHARFORGE_HEADERS"):
        try:
            headers = json.loads(env["CHARFORGE_HEADERS"])
        except ValueError:
            raise ConfigError(
                'CHARFORGE_HEADERS must be a JSON object, e.g. \'{"X-Api-Key": "..."}\''
            ) from None
        if not isinstance(headers, dict):
            raise ConfigError("CHARFORGE_HEADERS must be a JSON object of header names to values")
        parts.append(HeaderAuth({str(k): str(v) for k, v in headers.items()}))
    return parts


def _combine(parts: list[Auth]) -> Auth | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiAuth(parts)


def resolve_server(
    server: str | None = None,
    *,
    profile: str | None = None,
    auth: Auth | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> ServerConfig:
    """Work out the server URL and auth from arguments, environment and the config file.

    ``server`` may also be a profile name when it is not URL-like and such a profile exists.
    Returns a config whose URL is :data:`DEFAULT_SERVER` when nothing names a server (the caller decides
    whether to look for a local ComfyUI then); ``profile`` is None in that case.
    """
    env = os.environ if env is None else env
    path = config_path or config_file.config_path(env)
    data = load_config_file(path)
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"'profiles' in {path} must be a mapping of names to settings")
    warnings: list[str] = []

    if server and server in profiles and not any(c in server for c in ":/."):
        profile, server = server, None
    profile = profile or env.get("CHARFORGE_PROFILE") or None
    if profile is None and not server and not env.get("CHARFORGE_SERVER"):
        profile = data.get("default_profile")
    settings: Mapping[str, Any] = {}
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none defined"
            raise ConfigError(f"no profile {profile!r} in {path} (profiles: {known})")
        settings = profiles[profile] or {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"profile {profile!r} in {path} must be a mapping")
    where = f"profile {profile!r} in {path}"

    url_text = server or env.get("CHARFORGE_SERVER") or _expand(settings.get("server"), env, where) or None
    url_text = _runpod_url_text(url_text, settings, env)
    if url_text and url_text.startswith(REPLICATE_PREFIX):
        raise ConfigError(
            f"{url_text} is a Replicate model, not a ComfyUI server: use it with 'charforge "
            "run/status/cancel', 'charforge batch run' or 'charforge train --backend'"
        )
    url, url_auth = ServerURL.parse(url_text or DEFAULT_SERVER)

    parts: list[Auth] = []
    if auth is not None:
        parts = [auth]
    else:
        parts = _env_auth(env) or _profile_auth(settings, env, where)
        if url_auth is not None:
            parts.insert(0, url_auth)
    if settings and any(k in settings for k in ("token", "password")) and path.exists():
        mode = path.stat().st_mode
        if mode & 0o077:
            warnings.append(
                f"{path} holds a secret and is readable by other users; run: chmod 600 {path} "
                "(or use token_env/password_env)"
            )
    timeout = settings.get("timeout")
    try:
        job_timeout = float(timeout) if timeout is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: timeout must be a number of seconds") from None
    return ServerConfig(
        url=url,
        auth=_combine(parts),
        profile=profile if settings else None,
        job_timeout=job_timeout,
        verify_tls=bool(settings.get("verify_tls", True)),
        warnings=warnings,
        limits=Limits.resolve(settings, env),
    )


def _runpod_url_text(url_text: str | None, settings: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """``runpod-pod:ID`` becomes the pod's proxy URL; ``runpod-serverless:ID`` has no ComfyUI URL at all."""
    named = parse_runpod_server(url_text)
    if named is None:
        return url_text
    kind, ident = named
    if kind == "serverless":
        raise ConfigError(
            f"{url_text} is a RunPod serverless endpoint, not a ComfyUI server: use it with "
            "'charforge run/status/cancel' or a batch (charforge.driver.runpod.ServerlessTarget)"
        )
    section = settings.get("runpod") or {}
    port = int(section.get("port", 8188)) if isinstance(section, Mapping) else 8188
    template = section.get("proxy_url") if isinstance(section, Mapping) else None
    return runpod_proxy_url(ident, port, template, env)


def server_named(
    server: str | None,
    profile: str | None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> bool:
    """True when arguments, environment or a default profile name a server explicitly."""
    env = os.environ if env is None else env
    if server or profile or env.get("CHARFORGE_SERVER") or env.get("CHARFORGE_PROFILE"):
        return True
    data = load_config_file(config_path or config_file.config_path(env))
    return bool(data.get("default_profile"))


# ------------------------------------------------------------------------------------------------------------
# RunPod server strings (``runpod-pod:POD_ID``, ``runpod-serverless:ENDPOINT_ID``) and the ``runpod`` settings
# ------------------------------------------------------------------------------------------------------------

RUNPOD_POD_PREFIX = "runpod-pod:"
RUNPOD_SERVERLESS_PREFIX = "runpod-serverless:"
#: where a pod's HTTP port is reached; ``$CHARFORGE_RUNPOD_PROXY`` overrides it (tests point it at a fake)
RUNPOD_PROXY_TEMPLATE = "https://{pod_id}-{port}.proxy.runpod.net"
RUNPOD_API_URL = "https://api.runpod.io"  # REST v2 (pods, catalog, serverless management)
RUNPOD_ENDPOINT_URL = "https://api.runpod.ai/v2"  # serverless job API: {base}/{ENDPOINT_ID}/run ...
_RUNPOD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class RunPodSettings:
    """A RunPod target named by ``--server runpod-pod:ID`` / ``runpod-serverless:ID`` or a profile's ``runpod:``
    section. ``options`` holds the profile's remaining ``runpod`` keys (connect, port, keepalive, on_finish,
    create, price_per_hour, price_per_second, max_request_mb, capacity ...)."""

    kind: str  # "pod" | "serverless"
    id: str
    api_key: Secret | None = None
    api_url: str = RUNPOD_API_URL
    endpoint_url: str = RUNPOD_ENDPOINT_URL
    proxy_template: str = RUNPOD_PROXY_TEMPLATE
    options: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None

    def secrets(self) -> list[str]:
        return [self.api_key.reveal()] if self.api_key else []

    @property
    def server(self) -> str:
        prefix = RUNPOD_POD_PREFIX if self.kind == "pod" else RUNPOD_SERVERLESS_PREFIX
        return prefix + self.id

    def __repr__(self) -> str:
        key = MASK if self.api_key else None
        return (
            f"RunPodSettings(kind={self.kind!r}, id={self.id!r}, api_key={key!r}, profile={self.profile!r})"
        )


def parse_runpod_server(text: str | None) -> tuple[str, str] | None:
    """``("pod"|"serverless", ID)`` for a RunPod server string, None for anything else."""
    if not text:
        return None
    for prefix, kind in ((RUNPOD_POD_PREFIX, "pod"), (RUNPOD_SERVERLESS_PREFIX, "serverless")):
        if text.startswith(prefix):
            ident = text[len(prefix) :].strip().strip("/")
            if not _RUNPOD_ID.match(ident):
                raise ConfigError(
                    f"bad RunPod id in {text!r}: expected {prefix}ID with letters, digits, - or _"
                )
            return kind, ident
    return None


def runpod_proxy_url(
    pod_id: str, port: int = 8188, template: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The HTTPS proxy URL of a pod's HTTP port (``https://{pod_id}-{port}.proxy.runpod.net``)."""
    env = os.environ if env is None else env
    tpl = template or env.get("CHARFORGE_RUNPOD_PROXY") or RUNPOD_PROXY_TEMPLATE
    return tpl.format(pod_id=pod_id, port=int(port))


def runpod_api_key(
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    section: Mapping[str, Any] | None = None,
) -> Secret | None:
    """The RunPod API key: ``$RUNPOD_API_KEY``, else the config file's ``runpod: {api_key_env: NAME}`` (or the
    profile's ``runpod.api_key_env``). A literal ``api_key`` in the file works too but is discouraged."""
    env = os.environ if env is None else env
    for place in (section or {}, _runpod_file_section(env, config_path)):
        if place.get("api_key_env"):
            name = str(place["api_key_env"])
            if not env.get(name):
                raise ConfigError(f"runpod.api_key_env names environment variable {name!r}, which is not set")
            return Secret(env[name])
    if env.get("RUNPOD_API_KEY"):
        return Secret(env["RUNPOD_API_KEY"])
    for place in (section or {}, _runpod_file_section(env, config_path)):
        if place.get("api_key"):
            return Secret(str(_expand(place["api_key"], env, "runpod.api_key")))
    return None


_Named = TypeVar("_Named")  # what a hosted target's server-string parser returns


def _file_section(env: Mapping[str, str], config_path: Path | None, name: str) -> Mapping[str, Any]:
    """The config file's top-level `name` section (``runpod``, ``replicate``), {} when it has none."""
    data = load_config_file(config_path or config_file.config_path(env))
    section = data.get(name) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"the config file's {name!r} section must be a mapping")
    return section


def _hosted_profile(
    server: str | None,
    profile: str | None,
    env: Mapping[str, str],
    path: Path,
    parse: Callable[[str | None], _Named | None],
    key: str,
) -> tuple[_Named | None, str | None, Mapping[str, Any], Mapping[str, Any]] | None:
    """What a hosted target's resolver (RunPod, Replicate) starts from: the target `parse` reads from the
    server string, ``$CHARFORGE_SERVER`` or the profile's ``server:`` (None when none names one), the
    profile in force (explicit, a profile name given as the server, ``$CHARFORGE_PROFILE`` or the file's
    ``default_profile``), its settings and its `key` section. None when the server names another kind."""
    data = load_config_file(path)
    profiles = data.get("profiles") or {}
    if server and isinstance(profiles, dict) and server in profiles and not any(c in server for c in ":/."):
        profile, server = server, None
    named = parse(server) if server else None
    if server and named is None:
        return None
    if not server and env.get("CHARFORGE_SERVER"):
        named = parse(env["CHARFORGE_SERVER"])
        if named is None:
            return None
    profile = (
        profile or env.get("CHARFORGE_PROFILE") or (None if server or named else data.get("default_profile"))
    )
    settings: Mapping[str, Any] = {}
    if profile is not None and isinstance(profiles, dict) and isinstance(profiles.get(profile), Mapping):
        settings = profiles[profile]
    section = settings.get(key) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"profile {profile!r}: {key!r} must be a mapping")
    if named is None:
        named = parse(_expand(settings.get("server"), env, f"profile {profile!r}"))
    return named, profile, settings, section


def _runpod_file_section(env: Mapping[str, str], config_path: Path | None) -> Mapping[str, Any]:
    return _file_section(env, config_path, "runpod")


def resolve_runpod(
    server: str | None = None,
    *,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> RunPodSettings | None:
    """The RunPod target the arguments name, or None when they name an ordinary ComfyUI server.

    ``server`` may be ``runpod-pod:ID``, ``runpod-serverless:ID`` or a profile name; the profile (explicit,
    ``$CHARFORGE_PROFILE`` or the file's ``default_profile``) may say ``server: runpod-...`` and/or hold a
    ``runpod:`` section with ``pod: ID`` or ``endpoint: ID`` plus options.
    """
    env = os.environ if env is None else env
    path = config_path or config_file.config_path(env)
    found = _hosted_profile(server, profile, env, path, parse_runpod_server, "runpod")
    if found is None:
        return None
    named, profile, settings, section = found
    if named is None and section.get("pod"):
        named = ("pod", str(section["pod"]))
    if named is None and section.get("endpoint"):
        named = ("serverless", str(section["endpoint"]))
    if named is None:
        return None
    kind, ident = named
    file_section = _runpod_file_section(env, path)
    options = {
        k: v
        for k, v in {**file_section, **section}.items()
        if k not in ("api_key", "api_key_env", "pod", "endpoint")
    }
    return RunPodSettings(
        kind=kind,
        id=ident,
        api_key=runpod_api_key(env, path, section),
        api_url=str(env.get("CHARFORGE_RUNPOD_API_URL") or options.pop("api_url", None) or RUNPOD_API_URL),
        endpoint_url=str(
            env.get("RUNPOD_ENDPOINT_BASE_URL") or options.pop("endpoint_url", None) or RUNPOD_ENDPOINT_URL
        ),
        proxy_template=str(
            env.get("CHARFORGE_RUNPOD_PROXY") or options.pop("proxy_url", None) or RUNPOD_PROXY_TEMPLATE
        ),
        options=options,
        profile=profile if settings else None,
    )


# ------------------------------------------------------------------------------------------------------------
# Replicate server strings (``replicate:OWNER/MODEL[:VERSION]``) and the ``replicate`` settings
# ------------------------------------------------------------------------------------------------------------

REPLICATE_PREFIX = "replicate:"
REPLICATE_API_URL = "https://api.replicate.com"
_REPLICATE_MODEL = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})/([A-Za-z0-9][A-Za-z0-9._-]{0,99})"
    r"(?::([0-9a-f]{8,128}))?$"
)


@dataclass
class ReplicateSettings:
    """A Replicate model named by ``--server replicate:OWNER/MODEL[:VERSION]`` or a profile's ``replicate:``
    section (``model``, ``version``, ``token_env`` plus options: ``hardware``, ``price_per_second``, ``capacity``,
    ``poll_interval``, ``object_info``, ``output_format``, ``wait`` ...)."""

    model: str  # OWNER/NAME
    version: str | None = None  # a version id; None = the model's latest version
    token: Secret | None = None
    api_url: str = REPLICATE_API_URL
    options: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None

    def secrets(self) -> list[str]:
        return [self.token.reveal()] if self.token else []

    @property
    def server(self) -> str:
        return REPLICATE_PREFIX + self.model + (f":{self.version}" if self.version else "")

    def __repr__(self) -> str:
        token = MASK if self.token else None
        return f"ReplicateSettings(model={self.model!r}, version={self.version!r}, token={token!r})"


def parse_replicate_server(text: str | None) -> tuple[str, str | None] | None:
    """``(OWNER/MODEL, VERSION or None)`` for a ``replicate:`` server string, None for anything else."""
    if not text or not text.startswith(REPLICATE_PREFIX):
        return None
    match = _REPLICATE_MODEL.match(text[len(REPLICATE_PREFIX) :].strip())
    if match is None:
        raise ConfigError(
            f"bad Replicate model in {text!r}: expected replicate:OWNER/MODEL or "
            "replicate:OWNER/MODEL:VERSION_ID (the version id is hexadecimal)"
        )
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def replicate_token(
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    section: Mapping[str, Any] | None = None,
) -> Secret | None:
    """The Replicate API token: the profile's or the file's ``replicate: {token_env: NAME}``, else
    ``$REPLICATE_API_TOKEN``; a literal ``token`` in the file works too but is discouraged."""
    env = os.environ if env is None else env
    places = (section or {}, _replicate_file_section(env, config_path))
    for place in places:
        if place.get("token_env"):
            name = str(place["token_env"])
            if not env.get(name):
                raise ConfigError(
                    f"replicate.token_env names environment variable {name!r}, which is not set"
                )
            return Secret(env[name])
    if env.get("REPLICATE_API_TOKEN"):
        return Secret(env["REPLICATE_API_TOKEN"])
    for place in places:
        if place.get("token"):
            return Secret(str(_expand(place["token"], env, "replicate.token")))
    return None


def _replicate_file_section(env: Mapping[str, str], config_path: Path | None) -> Mapping[str, Any]:
    return _file_section(env, config_path, "replicate")


def resolve_replicate(
    server: str | None = None,
    *,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> ReplicateSettings | None:
    """The Replicate model the arguments name, or None when they name something else.

    ``server`` may be ``replicate:OWNER/MODEL[:VERSION]`` or a profile name; the profile may say ``server:
    replicate:...`` and/or hold a ``replicate:`` section with ``model`` (and ``version``) plus options.
    ``$CHARFORGE_REPLICATE_API_URL`` points the driver at another API base (tests use a loopback fake).
    """
    env = os.environ if env is None else env
    path = config_path or config_file.config_path(env)
    found = _hosted_profile(server, profile, env, path, parse_replicate_server, "replicate")
    if found is None:
        return None
    named, profile, settings, section = found
    if named is None and section.get("model"):
        named = parse_replicate_server(REPLICATE_PREFIX + str(section["model"]))
    if named is None:
        return None
    model, version = named
    file_section = _replicate_file_section(env, path)
    options = {
        k: v for k, v in {**file_section, **section}.items() if k not in ("token", "token_env", "model")
    }
    version = version or (str(options.pop("version")) if options.get("version") else None)
    options.pop("version", None)
    return ReplicateSettings(
        model=model,
        version=version,
        token=replicate_token(env, path, section),
        api_url=str(
            env.get("CHARFORGE_REPLICATE_API_URL") or options.pop("api_url", None) or REPLICATE_API_URL
        ),
        options=options,
        profile=profile if settings else None,
    )
