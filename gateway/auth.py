"""Who is connecting, and whether they may (docs/protocol.md §1 "Connecting", §3): client tokens
from any of the three places a client may put one, the Origin check, admin keys, and the client's
own address behind trusted proxies.

Secrets are compared in constant time over bytes. `hmac.compare_digest` raises TypeError when
given non-ASCII str, which a client could turn into a 500 with one header; on bytes it cannot
fail. ASGI hands header values over decoded as latin-1, so `.encode("latin-1")` gives back exactly
the bytes the client sent; query values are already UTF-8 text. Configured secrets are UTF-8.
Every configured secret is compared, whatever matched earlier, so the time taken does not say
which one matched.

A client's identity (what the per-client connection limit counts) is its token when client
tokens are configured, else its address; only a hash of it ever reaches Redis or a log line."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SUBPROTOCOL = "voicepipe.v1"  # offered by browsers beside `token.<T>`; the server answers with it
TOKEN_SUBPROTOCOL_PREFIX = "token."
# the OpenAI Realtime API's browser form of the key (`/v1/realtime`), beside `realtime`
OPENAI_KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def as_bytes(text: str) -> bytes:
    """Text (a query value, a configured secret) as UTF-8 bytes; never raises, even for lone surrogates."""
    return text.encode("utf-8", "surrogatepass")


def secret_matches(presented: bytes, valid: Sequence[bytes]) -> bytes | None:
    """The configured secret equal to `presented`, compared in constant time with all of them."""
    found = None
    for candidate in valid:
        if hmac.compare_digest(presented, candidate):
            found = candidate
    return found


def header_text_bytes(text: str) -> bytes:
    """The bytes a client sent, from a header value uvicorn decoded to text: as latin-1 (with
    websockets 17) or as ASCII with surrogate escapes (before it); this undoes either. Never
    raises: text no header could have produced is taken as UTF-8 (a wrong token, not a 500)."""
    try:
        return text.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:
        return as_bytes(text)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first raw value of a header (ASGI names are lower-case)."""
    for key, value in headers:
        if key == name:
            return value
    return None


def presented_tokens(query_token: str | None, authorization: bytes | None, subprotocols: Sequence[str]) -> list[bytes]:
    """Every token the client presented: `token` query parameter, `Authorization: Bearer`, and the
    first `token.<T>` and `openai-insecure-api-key.<T>` subprotocols (uvicorn decodes those to
    text, see `header_text_bytes`)."""
    tokens: list[bytes] = []
    if query_token:
        tokens.append(as_bytes(query_token))
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            tokens.append(credentials.strip())
    for prefix in (TOKEN_SUBPROTOCOL_PREFIX, OPENAI_KEY_SUBPROTOCOL_PREFIX):
        for offered in subprotocols:
            if offered.startswith(prefix):
                tokens.append(header_text_bytes(offered[len(prefix) :]))
                break
    return tokens


def valid_client_token(presented: Sequence[bytes], configured: Sequence[bytes]) -> bytes | None:
    """The configured token a client presented, or None."""
    found = None
    for token in presented:
        match = secret_matches(token, configured)
        if match is not None and found is None:
            found = match
    return found


def origin_allowed(origin: bytes | None, allowed: Sequence[str]) -> bool:
    """No Origin header (a CLI or server client) and an empty allow-list both pass."""
    if not allowed or origin is None:
        return True
    return origin.decode("latin-1") in allowed


def api_key_valid(presented: str, keys: Sequence[str]) -> bool:
    """An admin key from a header (latin-1 decoded by ASGI) against the configured keys."""
    if not presented or not keys:
        return False
    return secret_matches(presented.encode("latin-1", "replace"), [as_bytes(key) for key in keys]) is not None


def parse_networks(entries: Sequence[str]) -> list[IpNetwork]:
    """`TRUSTED_PROXIES`: addresses or CIDR networks; a bad entry is a settings error."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an IP address or network") from exc
    return networks


def _trusted(address: str, proxies: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(peer: str | None, forwarded_for: bytes | None, proxies: Sequence[IpNetwork]) -> str:
    """The client's address: the direct peer, unless that peer is a trusted proxy; then the
    right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its left
    were written by the client and prove nothing)."""
    address = peer or "unknown"
    if forwarded_for is None or not _trusted(address, proxies):
        return address
    hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return address  # garbage where the proxy should have written an address: count the proxy
        address = hop
    return address  # every hop is a proxy: the left-most one is as close to the client as we know


@dataclass(frozen=True)
class ClientIdentity:
    """What the per-client connection limit counts. `key` goes into Redis names, `label` into logs;
    neither contains a token."""

    key: str
    label: str

    @classmethod
    def of(cls, token: bytes | None, address: str) -> "ClientIdentity":
        if token is not None:
            digest = hashlib.sha256(b"token\0" + token).hexdigest()[:32]
            return cls(key=f"t-{digest}", label=f"token #{digest[:8]}")
        digest = hashlib.sha256(b"address\0" + address.encode("utf-8", "replace")).hexdigest()[:32]
        return cls(key=f"a-{digest}", label=f"address {address}")
