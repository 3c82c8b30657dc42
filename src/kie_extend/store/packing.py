"""How a job's request body is stored in its own key (``Keys.request``): JSON text, or packed.

A queued job's record must stay small enough for Redis to keep its hash as a listpack (every value
at most ``hash-max-listpack-value``, 64 bytes by default); the request JSON is several times that,
so it lives beside the record in a string key of its own. Most of a request is the same field
names and URL parts from job to job, so it is packed with raw DEFLATE against a preset dictionary
of those (a 250-byte request packs to about 100 bytes), whenever that is shorter.

Stored value (bytes), told apart by its first byte:

- ``{`` (or any other character JSON text can start with): the JSON text itself, UTF-8;
- ``\\x01``: raw DEFLATE (``wbits=-15``) of the UTF-8 JSON text with :data:`DICTIONARY_V1` as its
  preset dictionary.

A dictionary, once used, never changes: a new one would take the next version byte. Nothing but
JSON text is ever stored (never pickle).
"""

from __future__ import annotations

import zlib

#: Version byte of a value packed with :data:`DICTIONARY_V1`.
PACKED_V1 = b"\x01"

#: The preset dictionary of version 1: the extend request's field names and common values, the
#: most frequent last (DEFLATE reaches the end of the dictionary most cheaply). Never edit it.
DICTIONARY_V1 = (
    b'"personaId":"","personaModel":"","negativeTags":"","vocalGender":"f","vocalGender":"m",'
    b'"styleWeight":0.5,"weirdnessConstraint":0.5,"audioWeight":0.5,"model":"V4_5PLUS","model":"V4_5ALL",'
    b'"model":"V4_5","model":"V4","model":"V5_5","model":"V6_WILD","model":"V6_MINI","model":"V6",'
    b'"style":"","title":"","prompt":"[Chorus]\\n","prompt":"[Verse]\\n",'
    b'"instrumental":true,"instrumental":false,"continueAt":'
    b'"callBackUrl":"https://kie/callback/","model":"V5",'
    b'{"uploadUrl":"https://.mp3","defaultParamFlag":true,"defaultParamFlag":false,'
)


def pack(text: str) -> bytes:
    """The stored form of a request's JSON text: packed when that is shorter, else the text."""
    raw = text.encode()
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARY_V1)
    packed = PACKED_V1 + z.compress(raw) + z.flush()
    return packed if len(packed) < len(raw) else raw


def unpack(value: bytes | str) -> str:
    """The JSON text of a stored request (either form). Raises ValueError on an unknown version
    byte or a damaged packed value."""
    if isinstance(value, str):
        return value
    if not value.startswith(PACKED_V1):
        if value[:1] and value[:1] < b" " and value[:1] not in (b"\t", b"\n", b"\r"):
            raise ValueError(f"stored request: unknown format byte {value[:1]!r}")
        return value.decode()
    try:
        z = zlib.decompressobj(-15, DICTIONARY_V1)
        text = z.decompress(value[1:]) + z.flush()
    except zlib.error as exc:
        raise ValueError(f"stored request: damaged packed value ({exc})") from None
    return text.decode()


__all__ = ["pack", "unpack", "PACKED_V1", "DICTIONARY_V1"]
