"""SSRF guard: refuse URLs that are not http(s) or that lead to non-public addresses.

Every download of a provider-returned URL (and every redirect it follows) passes through
:func:`check_public_url` first, so a hostile or mistaken URL cannot make a worker fetch from
loopback, the private network or a cloud metadata endpoint. ``KIE_ALLOW_PRIVATE_URLS`` lifts the
address rule for a local simulator and tests; the scheme and host rules always apply.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Schemes a download may use.
ALLOWED_SCHEMES: frozenset[str] = frozenset({"http", "https"})

# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64 well-known prefix).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Short, octal and hex IPv4 spellings (``127.1``, ``0x7f.0.0.1``, ``2130706433``) that
# ``socket.inet_aton`` and many HTTP stacks accept, so they must be judged as addresses too.
_IPV4_LOOSE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is an IP literal (any IPv4 spelling), else None; no DNS."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_LOOSE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public_address(addr: IPAddress) -> bool:
    """True when ``addr`` is a globally routable unicast address (IPv4 inside IPv6 judged too)."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None and not is_public_address(inner):
            return False
    return not (
        addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved
        or addr.is_multicast or addr.is_unspecified or not addr.is_global
    )


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to; raises ValueError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ValueError(f"URL host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = ip_literal(str(sockaddr[0]))
        if addr is None:  # not an IP family we know how to judge: refuse rather than guess
            raise ValueError(f"URL host {host!r} resolves to an unrecognised address {sockaddr[0]!r}")
        addresses.append(addr)
    if not addresses:
        raise ValueError(f"URL host {host!r} does not resolve to any address")
    return addresses


def check_public_url(url: str, *, allow_private: bool) -> None:
    """Raise ValueError unless ``url`` is http(s) with a host that is (and resolves only to) public addresses.

    With ``allow_private`` the address rule is skipped (local simulator and tests); the scheme and
    host rules still apply. Host names are resolved with ``socket.getaddrinfo`` and every address
    must be public; IP literals are judged without any lookup.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("URL is empty")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"URL must be http or https, got scheme {parts.scheme or '(none)'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("URL has no host")
    if any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"URL has an invalid host {host!r}")
    if allow_private:
        return
    if host == "localhost" or host.endswith(".localhost"):
        raise ValueError(f"URL host {host!r} is a loopback name")
    literal = ip_literal(host)
    addresses = [literal] if literal is not None else _resolve(host, port or (443 if scheme == "https" else 80))
    for addr in addresses:
        if not is_public_address(addr):
            shown = host if literal is not None else f"{host} ({addr})"
            raise ValueError(f"URL host {shown} is not a public address (loopback, private, "
                             "link-local, reserved, multicast or unspecified)")
