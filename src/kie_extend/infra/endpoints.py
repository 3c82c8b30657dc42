"""Redis and broker endpoints: URL checks, password masking, and Redis Sentinel URLs.

One URL format serves the job store and the Celery broker alike:

- ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS),
  ``unix://[[user]:password@]/path/to/socket[?db=N]`` (job store only),
- ``sentinel://[[user]:password@]host1:26379;sentinel://host2:26379;…[/db]``: Redis Sentinel, the
  format of kombu's Redis transport. The master's name is ``KIE_SENTINEL_MASTER``; the password
  in the URL is the master's (as in kombu), a sentinel's own password is ``KIE_SENTINEL_PASSWORD``,
- ``amqp://`` / ``amqps://`` / ``pyamqp://`` (broker only, RabbitMQ).

Errors raised here never contain the URL's password, nor any part of it: messages are built from
fixed text and the scheme only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel"})
BROKER_SCHEMES = frozenset({"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp"})
SENTINEL_DEFAULT_PORT = 26379

_HINT = ("percent-encode special characters in the password (for example '#' as %23, '[' as %5B, "
         "'@' as %40, '/' as %2F, ':' as %3A, '%' as %25)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class EndpointError(ValueError):
    """A Redis or broker URL that cannot be used; the message never contains its password."""


def scheme_of(url: str) -> str:
    """The URL's scheme in lower case (``redis``, ``sentinel``, ``amqp`` …), or ``""`` without one."""
    match = _SCHEME.match(url.strip())
    return match.group(1).lower() if match else ""


def is_redis(url: str) -> bool:
    """Whether the URL names a Redis server or Redis Sentinel (not RabbitMQ)."""
    return scheme_of(url) in REDIS_SCHEMES


def check_url(url: str, *, broker: bool = False) -> str:
    """Return ``url`` unchanged if it is a usable job store (or, with ``broker``, broker) URL.

    Raises EndpointError (a ValueError) saying what is wrong and to percent-encode special
    characters in the password; the message never echoes the password or any part of it.
    """
    allowed = BROKER_SCHEMES if broker else REDIS_SCHEMES
    names = ", ".join(f"{s}://" for s in sorted(allowed))
    scheme = scheme_of(url)
    if not scheme:
        raise EndpointError(f"not a URL with a scheme; expected one of {names} such as "
                            f"redis://:PASSWORD@HOST:6379/0 ({_HINT})")
    if scheme not in allowed:
        if broker and scheme == "unix":
            raise EndpointError("the Celery broker cannot use a unix:// socket; set KIE_BROKER_URL to a "
                                "redis://, sentinel:// or amqp:// URL")
        raise EndpointError(f"unknown scheme {scheme}://; expected one of {names}")
    segments = url.strip().split(";")
    if scheme == "sentinel":
        for segment in segments:
            if scheme_of(segment) != "sentinel":
                raise EndpointError("every ';'-separated part of a sentinel URL must start with sentinel:// "
                                    f"(sentinel://HOST1:26379;sentinel://HOST2:26379/0); or {_HINT}")
    elif len(segments) > 1:
        raise EndpointError(f"contains ';', which only separates the sentinels of a sentinel:// URL; {_HINT}")
    for segment in segments:
        _check_segment(segment, scheme)
    if scheme == "sentinel":
        sentinel_endpoint(url)  # credentials and database must agree across the parts
    return url


def _check_segment(url: str, scheme: str) -> SplitResult:
    if "#" in url:
        raise EndpointError(f"contains '#', which would start a URL fragment and cut the URL short; {_HINT}")
    if any(c.isspace() for c in url):
        raise EndpointError(f"contains white space; {_HINT}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urllib's own message may quote part of the netloc (and so of the password): never reuse it.
        raise EndpointError(f"cannot be parsed (an unencoded '[', ']' or ':' in the password, or a port "
                            f"that is not a number from 0 to 65535); {_HINT}") from None
    if parts.netloc.count("@") > 1:
        raise EndpointError(f"contains more than one '@' before the host; {_HINT}")
    if re.search(r"%(?![0-9A-Fa-f]{2})", parts.netloc.rpartition("@")[0]):
        raise EndpointError(f"contains a '%' that does not start a %XX escape; {_HINT}")
    if scheme == "unix":
        if parts.hostname or not parts.path.strip("/"):
            raise EndpointError(f"a unix:// URL needs an absolute socket path, as in "
                                f"unix://:PASSWORD@/run/redis.sock?db=0; {_HINT}")
        return parts
    if not parts.hostname:
        raise EndpointError(f"has no host (write {scheme}://:PASSWORD@HOST:PORT/…); {_HINT}")
    if scheme in ("redis", "rediss", "sentinel"):
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise EndpointError(f"the database must be a number, as in {scheme}://HOST:PORT/0; {_HINT}")
    return parts


@dataclass(frozen=True)
class SentinelEndpoint:
    """A parsed ``sentinel://`` URL: the sentinels, and the master's database and credentials."""

    sentinels: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def url(self) -> str:
        """The URL with the credentials and database on every part, as kombu reads them from the first."""
        auth = ""
        if self.username or self.password:
            from urllib.parse import quote

            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(h)}:{p}/{self.db}" for h, p in self.sentinels)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def sentinel_endpoint(url: str) -> SentinelEndpoint:
    """Parse ``sentinel://h1:26379;sentinel://h2:26379/0``: credentials and the database may sit on
    any one part (kombu's docs put the database on the last); raises EndpointError if parts disagree."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    creds: set[tuple[str | None, str | None]] = set()
    for segment in url.strip().split(";"):
        parts = _check_segment(segment, "sentinel")
        sentinels.append((parts.hostname or "", parts.port or SENTINEL_DEFAULT_PORT))
        if parts.path.strip("/"):
            dbs.add(int(parts.path.strip("/")))
        if parts.username or parts.password:
            creds.add((unquote(parts.username) if parts.username else None,
                       unquote(parts.password) if parts.password is not None else None))
    if len(dbs) > 1:
        raise EndpointError("the parts of a sentinel URL name different databases; write the database once")
    if len(creds) > 1:
        raise EndpointError("the parts of a sentinel URL carry different credentials; write them once")
    username, password = next(iter(creds)) if creds else (None, None)
    return SentinelEndpoint(sentinels, dbs.pop() if dbs else 0, username or None, password)


def celery_broker_url(url: str) -> str:
    """The broker URL to hand Celery: a sentinel URL with credentials and database on every part
    (kombu takes both from the first part only); any other URL unchanged."""
    return sentinel_endpoint(url).url() if scheme_of(url) == "sentinel" else url


def sentinel_transport_options(broker_url: str, master_name: str,
                               sentinel_password: str | None = None) -> dict[str, Any]:
    """kombu transport options a ``sentinel://`` broker needs (``master_name``, ``sentinel_kwargs``);
    ``{}`` for any other broker. Merge them into ``broker_transport_options``."""
    if scheme_of(broker_url) != "sentinel":
        return {}
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 5}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    return {"master_name": master_name, "sentinel_kwargs": sentinel_kwargs}


def mask_url(url: str | None) -> str:
    """``url`` with every password replaced by ``***`` (``redis://:***@127.0.0.1:6380/0``); for logs.

    Works part by part on ``;``-separated sentinel URLs and never raises."""
    if not url:
        return str(url)
    return ";".join(_mask_one(part) for part in url.split(";"))


def _mask_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url or ":" in url else url
    at = rest.rfind("@")
    if at < 0:
        return url
    userinfo, hostpart = rest[:at], rest[at + 1:]
    if ":" not in userinfo:  # ``redis://secret@host``: a password written where the user goes
        return f"{scheme}://***@{hostpart}"
    user = userinfo.split(":", 1)[0]
    if any(c in user for c in "/?#"):  # a malformed URL: hide everything before the '@'
        user = ""
    return f"{scheme}://{user}:***@{hostpart}"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, no port) is ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def mask_text(text: str, settings: Any = None) -> str:
    """``text`` with every URL's password replaced by ``***`` and the API key (if known) removed."""
    text = _URL.sub(lambda m: mask_url(m.group(0)), text)
    key = settings.api_key_value() if settings is not None else ""
    if key and len(key) >= 4:
        text = text.replace(key, "***")
    for url in (getattr(settings, "redis_url", None), getattr(settings, "broker_url", None)):
        password = _password(url)
        if password and len(password) >= 3:
            text = text.replace(password, "***")
    return text


def _password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        parts = urlsplit(url.split(";")[0])
        return unquote(parts.password) if parts.password else None
    except ValueError:
        return None
