"""Admission: which waiting job gets the next submission slot (README "Sharing one account").

Queued jobs wait in ready queues, one per (priority, tenant), oldest first. When a submission slot
is free (the rolling rate window has room and so does the in-flight cap, nothing is paused, the
provider is reachable (reach.py) and the breaker lets jobs through), the job admitted is the oldest job of the highest priority present,
taking that priority's tenants in turn (round robin: the tenant served longest ago goes next; a
tenant that starts waiting goes next too). The choice is made by one Lua script at slot time, at
most one tick ahead: a job is never promised a slot minutes in advance, so a later, more urgent job
can still overtake it.

Admitting a job books its slot in the rate log (``b:<job>:<send>``, see gates.py) and puts it on the
due schedule at the slot's time. When that time comes a worker checks the booking against the sends
that really happened (``Gates.acquire``) and sends it. A job admitted but not sent (its worker died)
comes back through its due entry; a booking that went stale puts it back in its ready queue.

``KIE_TENANT_LIMITS`` (``svc-a=5/10s,svc-b=30/1m``) caps a tenant's own share on top of the
account's rate: a tenant at its cap sits a slot out and the next tenant in turn takes it.

``KIE_ADMISSION=arrival`` puts every job in one queue: the arrival order of earlier versions,
kept for comparison (the fairness benchmark runs both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import redis

from kie_extend.store.keys import Keys
from kie_extend.store.lua import LIB

# KEYS: pause, operator pause, inflight, rate log, breaker, priorities, admission seq, due, reach,
#       run-time tenant settings (tenants/settings.py), budget wait.
# ARGV: tag, max jobs, horizon ms, limit, book window ms, max in flight, probe timeout ms,
#       per-tenant caps JSON ({tenant: [count, window ms]}, "{}" for none), the caller's own job id
#       ("" none), lease seconds, tenant weights JSON ({tenant: weight} for weights other than 1),
#       budgets JSON ({tenant: [credits, window s]}, "{}" for none).
# A run-time setting (``<tenant>|weight``, ``<tenant>|rate``, ``<tenant>|budget`` in KEYS[10]) wins
# over ARGV's defaults, so an admin's change applies at the next admission on every worker and beat.
# An admitted job reserves its estimated price (reserve in lua.py's LIB) in the same step.
# Returns a flat list: job id, slot (ms), granted ("1" when the slot was the caller's own and due
# now: the send is recorded at once, as Gates.acquire would, saving the caller a round trip), ...
_ADMIT = LIB + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return {} end
-- KIE cannot be reached (reach.py): nobody is admitted until a probe or a poll gets an answer.
if redis.call('HGET', KEYS[9], 'state') == 'unreachable' then return {} end
local maxn, horizon = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, book, maxif = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local probe_only = false
local bst = redis.call('HGET', KEYS[5], 'state')
if bst == 'open' or bst == 'half_open' then
  if now < tonumber(redis.call('HGET', KEYS[5], 'until') or '0') then return {} end
  probe_only = true
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - book)
-- The bookings ('b:' members) are also kept in their own set (the rate log's key + ':b', see
-- Keys.rate_booked), so counting them takes no walk over every send in the window.
local RB = KEYS[4] .. ':b'
redis.call('ZREMRANGEBYSCORE', RB, '-inf', now - book)
local booked = redis.call('ZCOUNT', RB, now - book, '+inf')
local room = maxif - redis.call('SCARD', KEYS[3]) - booked
local n = math.min(maxn, room)
if probe_only then n = math.min(n, 1) end
local caps, weights = cjson.decode(ARGV[8]), cjson.decode(ARGV[11] or '{}')
-- A tenant's (count, window) setting `field`: its run-time value in KEYS[10] ("<count> <window>",
-- or "none"), else `fallback`'s (ARGV); false for none. Read once per tenant per call (`memo`).
local function pair_of(tenant, field, memo, fallback)
  local v = memo[tenant]
  if v ~= nil then return v end
  local o = redis.call('HGET', KEYS[10], tenant .. '|' .. field)
  if o == 'none' then v = false
  elseif o then
    local c, w = string.match(o, '^(%S+) (%S+)$')
    v = (tonumber(c) and tonumber(w)) and {tonumber(c), tonumber(w)} or false
  else v = fallback[tenant] or false end
  memo[tenant] = v
  return v
end
local capof = {}
-- A tenant's cap ({count, window ms}): its run-time setting, else KIE_TENANT_LIMITS or the tenants file.
local function cap_of(tenant) return pair_of(tenant, 'rate', capof, caps) end
-- A tenant's weight: its run-time setting, else the tenants file's (ARGV), else 1.
local function weight_of(tenant)
  return tonumber(redis.call('HGET', KEYS[10], tenant .. '|weight') or '') or tonumber(weights[tenant] or 1)
end
-- A tenant with a cap that already has `count` slots in the window ending at `slot` sits this
-- slot out; the next tenant in turn takes it.
local function capped(tenant, slot)
  local cap = cap_of(tenant)
  if not cap then return false end
  local lk = T .. ':tenant_rate:' .. tenant
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now - cap[2])
  return redis.call('ZCOUNT', lk, '(' .. (slot - cap[2]), '+inf') >= cap[1]
end
local budgets = cjson.decode(ARGV[12] or '{}')
local spent, budgetof = {}, {}
-- A tenant's budget ({credits, window s}): its run-time setting, else the tenants file's.
local function budget_of(tenant) return pair_of(tenant, 'budget', budgetof, budgets) end
-- A tenant's charged plus reserved credits in its budget's rolling window (whole SPEND_BUCKETs),
-- read once per call and kept up to date as this call reserves.
local function used(tenant, window)
  if spent[tenant] == nil then
    local sum, last = 0, math.floor(now / 1000 / SPEND_BUCKET)
    for b = math.floor((now / 1000 - window) / SPEND_BUCKET), last do
      sum = sum + (tonumber(redis.call('HGET', T .. ':spend:' .. b, tenant) or '0') or 0)
    end
    spent[tenant] = sum
  end
  return spent[tenant]
end
-- A tenant with a budget whose next job's price would take it past the budget waits (its jobs stay
-- queued; KEYS[11] says since when); the next tenant in turn takes the slot.
local function over_budget(tenant, prio)
  local cap = budget_of(tenant)
  if not cap then return false end
  local head = redis.call('ZRANGE', T .. ':ready:' .. prio .. ':' .. tenant, 0, 0)[1]
  local price = 0
  if head then
    local hk = T .. ':job:' .. head
    if redis.call('HEXISTS', hk, 'cr_open') == 0 then price = tonumber(redis.call('HGET', hk, 'price') or '0') or 0 end
  end
  if used(tenant, cap[2]) + price > cap[1] then
    redis.call('HSET', KEYS[11], tenant, math.floor(now / 1000))
    return true
  end
  return false
end
local function pick(slot)
  for _, prio in ipairs(redis.call('ZREVRANGE', KEYS[6], 0, -1)) do
    local tk = T .. ':tenants:' .. prio
    local tenants = redis.call('ZRANGE', tk, 0, -1)
    if #tenants == 0 then redis.call('ZREM', KEYS[6], prio) end
    for _, tenant in ipairs(tenants) do
      if not capped(tenant, slot) and not over_budget(tenant, prio) then return prio, tenant end
    end
  end
  return nil
end
local out = {}
local admitted, guard = 0, 0
while admitted < n and guard < n * 4 + 16 do
  guard = guard + 1
  -- The earliest slot that keeps every window of `book` ms within the limit.
  local cnt = redis.call('ZCARD', KEYS[4])
  local slot = now
  if cnt >= limit then
    local e = redis.call('ZRANGE', KEYS[4], cnt - limit, cnt - limit, 'WITHSCORES')
    slot = math.max(slot, tonumber(e[2]) + book)
  end
  local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
  if last[2] then slot = math.max(slot, tonumber(last[2])) end
  if slot > now + horizon then break end
  local prio, tenant = pick(slot)
  if not prio then break end
  local tk = T .. ':tenants:' .. prio
  do
    local rk = T .. ':ready:' .. prio .. ':' .. tenant
    local popped = redis.call('ZPOPMIN', rk)
    if redis.call('EXISTS', rk) == 0 then
      redis.call('ZREM', tk, tenant)
      redis.call('HDEL', T .. ':turn:' .. prio, tenant)
      if redis.call('EXISTS', tk) == 0 then redis.call('ZREM', KEYS[6], prio) end
    else
      -- Weighted round robin: a tenant of weight w keeps its turn for w slots, then goes to the
      -- back (weight 1: at once, the plain round robin).
      local w = weight_of(tenant)
      if w <= 1 or redis.call('HINCRBY', T .. ':turn:' .. prio, tenant, 1) >= w then
        if w > 1 then redis.call('HDEL', T .. ':turn:' .. prio, tenant) end
        redis.call('ZADD', tk, redis.call('INCR', KEYS[7]), tenant)
      end
    end
    if #popped > 0 then
      local id = popped[1]
      -- A follow-up step's sub-id "<job>~<n>" (store/steps.py) is admitted like a job: its entry's
      -- state, send counter and admission live in its job's hash.
      local base, sn = string.match(id, '^(.+)~(%d+)$')
      local jk = T .. ':job:' .. (base or id)
      local waiting
      if base then
        waiting = redis.call('HGET', jk, 'state') == 'submitted' and redis.call('HGET', jk, 'stepst:' .. sn) == 'queued'
      else
        waiting = redis.call('HGET', jk, 'state') == 'queued'
      end
      if waiting then
        local na = (not base) and tonumber(redis.call('HGET', jk, 'not_after') or '')
        if na and na * 1000 <= slot then
          -- Past its deadline: not sent; its due entry lets a worker cancel it now.
          redis.call('ZADD', KEYS[8], now / 1000, id)
        else
          local token = id .. ':' .. (tonumber(redis.call('HGET', jk, base and ('stepsends:' .. sn) or 'sends') or '0') + 1)
          local granted = id == ARGV[9] and slot <= now
          if granted then
            -- The caller sends it now: record the send and take its in-flight slot; its due entry
            -- (a lease away) brings it back if the caller dies before moving it on.
            redis.call('ZADD', KEYS[4], now, 's:' .. token)
            redis.call('SADD', KEYS[3], id)
            redis.call('ZADD', KEYS[8], now / 1000 + tonumber(ARGV[10]), id)
          else
            redis.call('ZADD', KEYS[4], slot, 'b:' .. token)
            redis.call('ZADD', RB, slot, 'b:' .. token)
            redis.call('PEXPIRE', RB, slot - now + book * 2 + 1000)
            redis.call('ZADD', KEYS[8], slot / 1000, id)
          end
          redis.call('PEXPIRE', KEYS[4], slot - now + book * 2 + 1000)
          redis.call('HSET', jk, base and ('stepadm:' .. sn) or 'admitted', slot)
          local reserved = base and 0 or reserve(jk, now / 1000)
          local budget = budget_of(tenant)
          if budget then spent[tenant] = used(tenant, budget[2]) + reserved end
          redis.call('HDEL', KEYS[11], tenant)
          local cap = cap_of(tenant)
          if cap then
            redis.call('ZADD', T .. ':tenant_rate:' .. tenant, slot, id)
            redis.call('PEXPIRE', T .. ':tenant_rate:' .. tenant, slot - now + cap[2] + 1000)
          end
          if probe_only then
            redis.call('HSET', KEYS[5], 'state', 'half_open', 'probe', id, 'until', now + tonumber(ARGV[7]))
          end
          table.insert(out, id)
          table.insert(out, tostring(slot))
          table.insert(out, granted and '1' or '0')
          admitted = admitted + 1
        end
      end
    end
  end
end
return out
"""

Mode = Literal["fair", "arrival"]


@dataclass(frozen=True)
class Admitted:
    """A job given a submission slot: send it at ``at`` (epoch seconds)."""

    job_id: str
    at: float
    #: The caller's own job, due now: its send is already recorded (no Gates.acquire needed).
    granted: bool = False


class Admission:
    """Hands free submission slots to waiting jobs by priority, then tenant, then age."""

    def __init__(self, client: redis.Redis, keys: Keys, *, rate: tuple[int, float], margin: float,
                 max_in_flight: int, probe_timeout: float, mode: Mode = "fair",
                 tenant_limits: dict[str, tuple[int, float]] | None = None,
                 weights: dict[str, int] | None = None,
                 budgets: dict[str, tuple[float, float]] | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.limit, self.window = rate
        self.margin = margin
        self.max_in_flight = max_in_flight
        self.probe_timeout = probe_timeout
        self.mode = mode
        # {tenant: [count, window ms]}: a tenant's own cap on top of the account's rate.
        self._caps = json.dumps({t: [int(n), int(w * 1000)] for t, (n, w) in (tenant_limits or {}).items()})
        # {tenant: weight} for the tenants file's weights other than 1 (run-time settings win, in Redis).
        self._weights = json.dumps({t: int(w) for t, w in (weights or {}).items() if int(w) != 1})
        self._admit = client.register_script(_ADMIT)
        # {tenant: [credits, window s]}: the tenants file's budgets (credits/budgets.py; run-time
        # settings win, in Redis).
        self._budgets = json.dumps({t: [float(c), float(w)] for t, (c, w) in (budgets or {}).items()})

    def queue_of(self, tenant: str, priority: int) -> str:
        """The ready queue a job of ``tenant`` at ``priority`` waits in: ``"priority|tenant"``."""
        return "5|*" if self.mode == "arrival" else f"{priority}|{tenant}"

    def admit(self, max_jobs: int, horizon: float = 0.0, *, own: str = "", lease: float = 60.0,
              pipe: Any = None) -> list[Admitted]:
        """Admit up to ``max_jobs`` waiting jobs whose slots fall within ``horizon`` seconds from now.

        Each one's slot is booked and it is on the due schedule at that time; the caller sends it
        then (or hands it to a worker with a countdown). When ``own`` (the caller's job) is admitted
        to a slot that is due now, its send is recorded at once (``granted``) and its due entry is
        ``lease`` seconds away. Returns them in admission order. With ``pipe`` (a store.jobstore.OneTrip)
        the call is only queued on it and ``[]`` is returned: :meth:`admitted` reads its reply."""
        k = self.keys
        call = dict(
            keys=[k.pause, k.operator_pause, k.inflight, k.rate_log, k.breaker, k.priorities, k.admission_seq,
                  k.due, k.reach, k.tenant_settings, k.budget_wait],
            args=[k.tag, int(max_jobs), int(horizon * 1000), self.limit,
                  int(round((self.window + self.margin) * 1000)), self.max_in_flight, int(self.probe_timeout * 1000),
                  self._caps, own, repr(float(lease)), self._weights, self._budgets])
        if pipe is not None:
            pipe.add(self._admit, **call)
            return []
        return self.admitted(self._admit(**call))

    @staticmethod
    def admitted(found: Any) -> list[Admitted]:
        """The jobs an admit call's reply names, in admission order."""
        return [Admitted(_t(found[i]), int(found[i + 1]) / 1000.0, _t(found[i + 2]) == "1")
                for i in range(0, len(found), 3)]

    def waiting(self) -> dict[str, dict[str, int]]:
        """Jobs waiting for a slot: ``{priority: {tenant: n}}``, highest priority first."""
        out: dict[str, dict[str, int]] = {}
        for prio in self.redis.zrevrange(self.keys.priorities, 0, -1):
            p = _t(prio)
            tenants = [_t(x) for x in self.redis.zrange(self.keys.tenants(p), 0, -1)]
            pipe = self.redis.pipeline(transaction=False)
            for tenant in tenants:
                pipe.zcard(self.keys.ready(p, tenant))
            out[p] = dict(zip(tenants, (int(n) for n in pipe.execute())))
        return out


def _t(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
