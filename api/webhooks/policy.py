"""Where a webhook may go: public addresses only, checked twice.

At submission (`check_url`: literal addresses in any form the resolver accepts, `localhost` and
its subdomains in any case, with or without a trailing dot) and before every delivery
(`resolve_destination`: the host is resolved and the request goes to the checked address itself),
so a DNS answer that changes in between cannot point a delivery inside the network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeDestination(ValueError):
    pass


# IPv6 addresses that reach an IPv4 host: Python calls the NAT64 and IPv4-compatible ones global
# whatever IPv4 address they carry, so `[64:ff9b::a9fe:a9fe]` would reach 169.254.169.254.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Local-use NAT64 (RFC 8215): where the IPv4 address sits is the translator's choice, so it cannot be read.
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# IPv4-translated (RFC 2765 SIIT, ::ffff:0:a.b.c.d): carries an IPv4 address as ::ffff:a.b.c.d does.
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64 or ip in IPV4_COMPATIBLE or ip in IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:  # Teredo (2001::/32): judged by the client IPv4 address it reaches
        return ip.teredo[1]
    return ip.sixtofour


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """What the C resolver makes of a host written as a legacy IPv4 number (`127.1`, `0x7f.0.0.1`,
    `2130706433`, `0177.0.0.1`), which `ipaddress` does not parse; None for a real host name."""
    if not host or not all(c in "0123456789abcdefx." for c in host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _allowed(ip: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    if any(ip.version == net.version and ip in net for net in allowed):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return _allowed(inner, allowed)
        if ip in NAT64_LOCAL:
            return False
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allowed: Sequence[IPNetwork]) -> str | None:
    """What is wrong with a webhook URL at submission, or None. Names are resolved at delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@); authenticate the call by its signature"
    host = parts.hostname
    if not host:
        return "has no host"
    # urlsplit lowercases the host; a trailing dot names the same host (`LOCALHOST.`, `a.localhost.`).
    bare = host.rstrip(".") if host.endswith(".") and not host.endswith("..") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        legacy = _legacy_ipv4(bare)
        if legacy is not None:
            ip = legacy
        elif bare == "localhost" or bare.endswith(".localhost"):
            ip = ipaddress.ip_address("127.0.0.1")
        else:
            try:
                host.encode("idna")  # as the resolver will at delivery; URL parsers accept `a..b.com`
            except UnicodeError:
                return "has a host name that cannot be looked up (an empty or over-long label)"
            return None
    if not _allowed(ip, allowed):
        return f"points at a private, loopback or link-local address ({ip}); not allowed here"
    return None


def resolve_destination(url: str, allowed: Sequence[IPNetwork]) -> tuple[str, str, str]:
    """(URL with the host replaced by a checked address, Host header, host name for TLS)."""
    problem = check_url(url, allowed)
    if problem:
        raise UnsafeDestination(f"webhook URL {problem}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve the webhook host: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    bad = [ip for ip in addresses if not _allowed(ip, allowed)]
    if bad or not addresses:
        raise UnsafeDestination(
            f"webhook host resolves to a non-public address ({bad[0] if bad else 'none'})"
        )
    ip = addresses[0]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    host_header = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc)), host_header, host


def host_of(url: str) -> str:
    """What logs may say about a destination: scheme and host, never a path or query (tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"
