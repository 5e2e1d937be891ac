"""Signed result URLs: a token that names one sample of one finished job until an expiry time,
for whoever holds it, with no API key and without naming the job.

A token is ``<payload>.<signature>``, both base64url without padding:

- signature: HMAC-SHA256 over (sample index, expiry, job id) under a key derived from the
  deployment's secret (``SKIPDIT_URL_SECRET``);
- payload: the index (2 bytes) and the expiry (8 bytes, Unix seconds), big-endian, then the job
  id encrypted with a keystream that HMAC-SHA256 derives, under a second derived key, from the
  signature (the signature is the synthetic IV, as in SIV). The URL therefore does not reveal
  the job id: a holder gets the sample's bytes and nothing of the job's other routes.

``verify`` decrypts, recomputes the signature and compares it in constant time; a change to
either part, or a non-canonical encoding of one, fails it as a whole (it never says which part).
Expiry is the caller's to check against its clock.

Every API replica must sign with the same secret. Only the embedded single-process deployment
(no Redis) may go without one: it then signs with a random secret of its own process (its URLs
die with the process, as its in-memory results do).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import struct
from dataclasses import dataclass

from service.settings import Settings

_HEAD = struct.Struct(">HQ")  # sample index, expiry (Unix seconds)
_TAG_BYTES = hashlib.sha256().digest_size
MAX_TOKEN_CHARS = 512  # longer is no token of ours: refused before any work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileRef:
    """What a token names: sample ``index`` of job ``job_id``, until ``expires``."""

    job_id: str
    index: int
    expires: int  # Unix seconds: the result's own expiry (finished + SKIPDIT_RESULT_TTL_S)


class UrlSigner:
    """Makes and checks tokens under one secret."""

    def __init__(self, secret: bytes):
        self._mac = hmac.new(secret, b"skipdit result url: signature", hashlib.sha256).digest()
        self._enc = hmac.new(secret, b"skipdit result url: job id", hashlib.sha256).digest()

    def sign(self, ref: FileRef) -> str:
        head = _HEAD.pack(ref.index, ref.expires)
        job = ref.job_id.encode()
        tag = self._tag(head, job)
        return f"{_encode(head + _xor(job, self._stream(tag, len(job))))}.{_encode(tag)}"

    def verify(self, token: str) -> FileRef | None:
        """The reference a genuine token names; None for anything else."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            return None
        first, second = token.split(".")
        payload, tag = _decode(first), _decode(second)
        if payload is None or tag is None or len(payload) <= _HEAD.size or len(tag) != _TAG_BYTES:
            return None
        head, sealed = payload[: _HEAD.size], payload[_HEAD.size :]
        job = _xor(sealed, self._stream(tag, len(sealed)))
        if not hmac.compare_digest(tag, self._tag(head, job)):
            return None
        index, expires = _HEAD.unpack(head)
        return FileRef(job.decode(), index, expires)  # signed by us: our own UTF-8

    def _tag(self, head: bytes, job: bytes) -> bytes:
        return hmac.new(self._mac, head + job, hashlib.sha256).digest()  # head: fixed length

    def _stream(self, tag: bytes, size: int) -> bytes:
        """``size`` keystream bytes for the token signed ``tag`` (HMAC in counter mode)."""
        blocks = -(-size // _TAG_BYTES)
        return b"".join(
            hmac.new(self._enc, tag + i.to_bytes(4, "big"), hashlib.sha256).digest()
            for i in range(blocks)
        )[:size]


def signer_for(settings: Settings) -> UrlSigner | None:
    """The deployment's signer: SKIPDIT_URL_SECRET's; without it, a random per-process one for
    the embedded single-process deployment (a warning says so), and none with Redis (where
    API replicas may be several: ``response_format: "url"`` is refused)."""
    if settings.url_secret is not None:
        return UrlSigner(settings.url_secret.get_secret_value().encode())
    if settings.redis_url is None:
        log.warning(
            "SKIPDIT_URL_SECRET is unset: result URLs are signed with a random secret of this "
            "process and stop working when it restarts; set it to keep them valid"
        )
        return UrlSigner(secrets.token_bytes(32))
    log.info("SKIPDIT_URL_SECRET is unset: result URLs (response_format url) are off")
    return None


def _xor(data: bytes, stream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, stream, strict=True))


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes | None:
    """base64url without padding; None unless ``text`` is the canonical encoding of its bytes."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _encode(data) == text else None
