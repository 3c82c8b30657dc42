"""What a producer may reuse: idempotency keys (checked by fingerprint) and explicit job ids (claimed).

**Idempotency keys** are scoped by tenant (``Keys.idempotency``) and remember the fingerprint of the
first request that used them: a SHA-256 of the canonical JSON of the request body and the tenant
(:func:`request_fingerprint`). ``metadata``, ``priority``, ``batch_id`` and ``not_after`` are left
out: they change neither what KIE generates nor who pays for it, so a retry that carries a new trace
id in its metadata, or a higher priority, is still the same work. The worker decides in one atomic
step (:data:`IDEM`): the first job of a key goes ahead, a later one with the same fingerprint is a
duplicate (``duplicate_of``), a later one with another fingerprint is refused. Producers (the
Python API, ``/v1``, ``batch submit``) ask the same script without writing first, so they can refuse
at once; two producers racing past that check are still told apart by the worker.

**Explicit job ids** are claimed at the producer's entrance (:data:`CLAIM`): ``SET NX`` of the
message's digest, checked against an existing record in the same step, so of two simultaneous
producers exactly one wins. Once the message is published the claim is marked ``:sent``: a producer
that finds its own digest marked sent does not publish again (a re-run of a batch file, a retried HTTP
call whose answer was lost), one that finds its digest not yet marked sent publishes again (the
first producer may have died before publishing; the worker treats the second message as a
redelivery). A claim is a key with a TTL, never a record: a producer that dies between claim and
publish leaves nothing for the sweep to find.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Message of a request refused because its idempotency key was first used for another request.
CONFLICT_MESSAGE = "idempotency key reused with a different request"

#: Suffix of a claim whose message was published.
SENT = ":sent"

# KEYS[1]: the idempotency key (Keys.idempotency), KEYS[2]: its name before keys were scoped by
# tenant (Keys.legacy_idempotency). ARGV: job id, fingerprint, ttl seconds, "1" to only look (write
# nothing). Returns {outcome, first job id}: "first" (this job holds the key: the first use, or a
# redelivery of the first job's message), "duplicate" (same fingerprint) or "conflict" (another
# request holds the key). A key written before fingerprints (a plain string, under either name,
# still alive in its window after an upgrade) counts as the same request, as it did then.
IDEM = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' and redis.call('TYPE', KEYS[2])['ok'] == 'string' then
  local old = redis.call('GET', KEYS[2])
  if old == ARGV[1] then return {'first', old} end
  return {'duplicate', old}
end
if t == 'none' then
  if ARGV[4] ~= '1' then
    redis.call('HSET', KEYS[1], 'job', ARGV[1], 'fp', ARGV[2])
    redis.call('EXPIRE', KEYS[1], ARGV[3])
  end
  return {'first', ARGV[1]}
end
local job, fp
if t == 'string' then job = redis.call('GET', KEYS[1]); fp = ARGV[2]
else job = redis.call('HGET', KEYS[1], 'job'); fp = redis.call('HGET', KEYS[1], 'fp') end
if job == ARGV[1] then return {'first', job} end
if fp == ARGV[2] then return {'duplicate', job} end
return {'conflict', job}
"""

# KEYS[1]: the claim (Keys.job_claim), KEYS[2]: the job record. ARGV: digest ("" = unknown yet: only
# look), ttl seconds. Returns "won" (claimed now), "unsent" (claimed with this digest, not yet
# marked sent), "sent" (claimed with this digest and published), "recorded" (a worker recorded this
# very message), "taken" (another request holds the id).
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[1] ~= '' and redis.call('HGET', KEYS[2], 'msg_sha') == ARGV[1] then return 'recorded' end
  return 'taken'
end
local cur = redis.call('GET', KEYS[1])
if not cur then
  if ARGV[1] == '' then return 'won' end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 'won'
end
if ARGV[1] == '' then return 'taken' end
if cur == ARGV[1] then return 'unsent' end
if cur == ARGV[1] .. '""" + SENT + """' then return 'sent' end
return 'taken'
"""

# KEYS: claims. ARGV: their digests, in order. Marks each claim that still holds its digest as sent.
MARK_SENT = """
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then redis.call('SET', k, ARGV[i] .. '""" + SENT + """', 'KEEPTTL') end
end
return 1
"""

# KEYS: claims. ARGV: their digests. Gives back claims still holding their (unsent) digest.
RELEASE = """
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then redis.call('DEL', k) end
end
return 1
"""


def _numbers(value: Any) -> Any:
    """``value`` with every integral float made an int (``12.0`` -> ``12``): JSON numbers compare
    by value, as the provider reads them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, integral floats written as ints."""
    return json.dumps(_numbers(value), sort_keys=True, separators=(",", ":"), default=str)


def request_fingerprint(request: Any, tenant: str) -> str:
    """SHA-256 (hex) of the canonical JSON (sorted keys, no spaces, ``12.0`` as ``12``) of ``{"request", "tenant"}``:
    what an idempotency key dedups. The request is taken as the producer sent it (before the
    worker adds ``callBackUrl``)."""
    return hashlib.sha256(_canonical({"request": request, "tenant": tenant}).encode()).hexdigest()


def message_digest(request: Any, idempotency_key: Any, metadata: Any, options: dict[str, Any] | None = None) -> str:
    """SHA-256 (hex) of an extend message's whole content, to tell a redelivery (or a producer's
    retry) from a reused job id. Options that are None are left out."""
    blob = _canonical({"r": request, "k": idempotency_key, "m": metadata,
                       **{k: v for k, v in (options or {}).items() if v is not None}})
    return hashlib.sha256(blob.encode()).hexdigest()


def kwargs_digest(kwargs: dict[str, Any]) -> str:
    """:func:`message_digest` of an extend message's kwargs as the worker will read them (after JSON)."""
    from kie_extend.jobs.intake import EXTEND_OPTIONS

    kw = json.loads(json.dumps(kwargs, default=str))
    return message_digest(kw.get("request"), kw.get("idempotency_key"), kw.get("metadata"),
                          {k: kw.get(k) for k in EXTEND_OPTIONS})


class Idempotency:
    """The scripts above, registered on one Redis client, under one key prefix."""

    def __init__(self, client: Any, keys: Any, window: float) -> None:
        self.redis = client
        self.keys = keys
        self.ttl = max(1, int(window))
        self._idem = client.register_script(IDEM)
        self._claim = client.register_script(CLAIM)
        self._mark = client.register_script(MARK_SENT)
        self._release = client.register_script(RELEASE)

    def use_key(self, key: str, tenant: str, job_id: str, fingerprint: str, *, look: bool = False) -> tuple[str, str]:
        """``(outcome, first job id)`` for ``job_id`` using idempotency ``key`` in ``tenant``; the
        outcome is ``first``, ``duplicate`` or ``conflict``. ``look``: write nothing."""
        out = self._idem(keys=[self.keys.idempotency(key, tenant), self.keys.legacy_idempotency(key)],
                         args=[job_id, fingerprint, self.ttl, "1" if look else ""])
        return _t(out[0]), _t(out[1])

    def look_keys(self, uses: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
        """:meth:`use_key` without writing, for many ``(key, tenant, job_id, fingerprint)`` at once
        (one pipelined round trip): what the worker would decide now."""
        pipe = self.redis.pipeline(transaction=False)
        for key, tenant, job_id, fp in uses:
            self._idem(keys=[self.keys.idempotency(key, tenant), self.keys.legacy_idempotency(key)],
                       args=[job_id, fp, self.ttl, "1"], client=pipe)
        return [(_t(o), _t(f)) for o, f in pipe.execute()] if uses else []

    def first_job(self, key: str, tenant: str) -> str | None:
        """The first job that used ``key`` in ``tenant``, while the key lives."""
        name = self.keys.idempotency(key, tenant)
        if _t(self.redis.type(name)) == "string":
            found = self.redis.get(name)
        else:
            found = self.redis.hget(name, "job")
        return _t(found) if found else None

    def claim(self, wanted: list[tuple[str, str]]) -> list[str]:
        """Claim explicit job ids: ``(job_id, digest)`` pairs ("" digest = only look), one outcome
        each (see :data:`CLAIM`), in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, digest in wanted:
            self._claim(keys=[self.keys.job_claim(job_id), self.keys.job(job_id)], args=[digest, self.ttl],
                        client=pipe)
        return [_t(x) for x in pipe.execute()] if wanted else []

    def mark_sent(self, claimed: list[tuple[str, str]]) -> None:
        """Mark published claims ``(job_id, digest)`` as sent."""
        for i in range(0, len(claimed), 1000):
            part = claimed[i:i + 1000]
            self._mark(keys=[self.keys.job_claim(j) for j, _ in part], args=[d for _, d in part])

    def release(self, claimed: list[tuple[str, str]]) -> None:
        """Give back claims ``(job_id, digest)`` whose message will not be published after all."""
        for i in range(0, len(claimed), 1000):
            part = claimed[i:i + 1000]
            self._release(keys=[self.keys.job_claim(j) for j, _ in part], args=[d for _, d in part])


def _t(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
