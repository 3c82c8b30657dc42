"""The job store's Lua: one library of functions shared by every script that changes a job.

A state change, a cancellation and an admission all have to keep the same things in step (the
record, the state indexes, the in-flight set, the ready queues, the deadline index, the batch
counts, the outbox of result events), so each is written once here and prepended to the scripts
that need it. Every key lives under the prefix's hash tag (see keys.py); keys named by a job's own
fields (its ready queue, its batch) are built here from ``T``, the tag, and stay in the same slot.
"""

from __future__ import annotations

from kie_extend.store.keys import LEDGER_BUCKET, LEDGER_TTL, MINUTE_TTL, SPEND_BUCKET
from kie_extend.jobs.states import JobState

#: States with an index key, in the order the transition script receives them after its fixed keys.
STATE_ORDER: tuple[JobState, ...] = tuple(s for s in JobState if s is not JobState.NOT_FOUND)

#: Moves kept in a job's ``history`` field ([epoch seconds, from, to], oldest first).
HISTORY_MAX = 20

#: Fixed keys of the transition script, before the state indexes.
TRANSITION_KEYS = ("job", "due", "inflight", "deliveries", "stats", "deadlines", "rate", "priorities", "seq",
                   "breaker", "request")

LIB = """
local T = ARGV[1]
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local LEDGER_BUCKET, SPEND_BUCKET, LEDGER_TTL = """ + f"{LEDGER_BUCKET}, {SPEND_BUCKET}, {LEDGER_TTL}" + """

-- The credit ledger (credits/ledger.py, Keys.ledger and Keys.spend): add `amount` credits of `kind`
-- (reserved, charged, refunded, settled: the reservations settled) to the bucket of time `ts` for `tenant` and `op`; `held` is what a
-- budget counts (charged plus still reserved), in the tenant's spend bucket of `ts`.
local function ledger_add(ts, tenant, op, kind, amount, held)
  if amount ~= 0 then
    local lk = T .. ':ledger:' .. math.floor(ts / LEDGER_BUCKET)
    redis.call('HINCRBYFLOAT', lk, tenant .. '|' .. op .. '|' .. kind, amount)
    redis.call('EXPIRE', lk, LEDGER_TTL)
  end
  if held ~= 0 then
    local sk = T .. ':spend:' .. math.floor(ts / SPEND_BUCKET)
    redis.call('HINCRBYFLOAT', sk, tenant, held)
    redis.call('EXPIRE', sk, LEDGER_TTL)
  end
end

-- Reserve a job's estimated price (its 'price' field) when it is admitted at `ts` (unix seconds):
-- once until it is settled ('cr_open' holds the open reservation). Returns the credits reserved.
local function reserve(jk, ts)
  if redis.call('HEXISTS', jk, 'cr_open') == 1 then return 0 end
  local price = tonumber(redis.call('HGET', jk, 'price') or '')
  if not price then return 0 end
  redis.call('HSET', jk, 'cr_open', price, 'cr_ts', ts)
  redis.call('HINCRBYFLOAT', jk, 'cr_reserved', price)
  ledger_add(ts, redis.call('HGET', jk, 'tenant') or '', 'extend', 'reserved', price, price)
  return price
end

-- Settle a job's open reservation, in the buckets of its reservation: `spec` 'auto' charges all of
-- it when the provider accepted the job (it has a task id) and nothing when it never did, 'open'
-- charges all of it, a number charges that; what is not charged is refunded. Without an open
-- reservation (never reserved, or settled already) it does nothing: a job is never charged twice.
local function settle(jk, spec)
  local open = tonumber(redis.call('HGET', jk, 'cr_open') or '')
  if not open then return end
  local charge
  if spec == 'auto' then
    charge = redis.call('HGET', jk, 'kie_task_id') and open or 0
  elseif spec == 'open' then
    charge = open
  else
    charge = math.max(tonumber(spec) or open, 0)
  end
  local refund = math.max(open - charge, 0)
  local ts = tonumber(redis.call('HGET', jk, 'cr_ts') or '0')
  local tenant = redis.call('HGET', jk, 'tenant') or ''
  redis.call('HDEL', jk, 'cr_open')
  redis.call('HINCRBYFLOAT', jk, 'cr_charged', charge)
  redis.call('HINCRBYFLOAT', jk, 'cr_refunded', refund)
  ledger_add(ts, tenant, 'extend', 'charged', charge, charge - open)
  ledger_add(ts, tenant, 'extend', 'refunded', refund, 0)
  ledger_add(ts, tenant, 'extend', 'settled', open, 0)
end

-- The job's ready queue: "priority|tenant" as stored in its 'rq' field.
local function rq_keys(rq)
  local sep = string.find(rq, '|', 1, true)
  local prio, tenant = string.sub(rq, 1, sep - 1), string.sub(rq, sep + 1)
  return prio, tenant, T .. ':ready:' .. prio .. ':' .. tenant, T .. ':tenants:' .. prio
end

-- Put a queued job in its ready queue (scored by age), its tenant in the priority's round robin
-- (a newcomer goes just before the tenant served last, so it is served next), and the priority in
-- the set of waiting priorities. KEYS passed: priorities set, admission sequence.
local function ready_add(jk, id, prios_key, seq_key)
  local rq = redis.call('HGET', jk, 'rq')
  if not rq then return 0 end
  local prio, tenant, rk, tk = rq_keys(rq)
  local created = tonumber(redis.call('HGET', jk, 'created_ts') or '0')
  redis.call('ZADD', rk, 'NX', created, id)
  if not redis.call('ZSCORE', tk, tenant) then
    local seq = tonumber(redis.call('GET', seq_key) or '0')
    redis.call('ZADD', tk, seq - 0.5, tenant)
    redis.call('HDEL', T .. ':turn:' .. prio, tenant)  -- a newcomer starts a fresh weighted turn
  end
  redis.call('ZADD', prios_key, tonumber(prio), prio)
  return 1
end

-- Take a job out of its ready queue; drop an emptied tenant and priority.
local function ready_remove(jk, id, prios_key)
  local rq = redis.call('HGET', jk, 'rq')
  if not rq then return end
  local prio, tenant, rk, tk = rq_keys(rq)
  if redis.call('ZREM', rk, id) == 1 and redis.call('EXISTS', rk) == 0 then
    redis.call('ZREM', tk, tenant)
    if redis.call('EXISTS', tk) == 0 then redis.call('ZREM', prios_key, prio) end
  end
end

-- Batch bookkeeping for one move of a job from `cur` ('' = new) to `to` ('duplicate' for an
-- idempotency duplicate, done at once); returns the batch's finished event (JSON) when this move
-- ended its last job, else nil.
local function batch_move(jk, id, cur, to, now, now_iso)
  local b = redis.call('HGET', jk, 'batch_id')
  if not b or b == '' then return nil end
  local bk = T .. ':batch:' .. b
  local members = T .. ':batchjobs:' .. b
  if cur == '' then
    if redis.call('HSETNX', bk, 'created_ts', now) == 1 then
      redis.call('ZADD', T .. ':batches', now, b)
    end
    -- The batch's total is its member count: ids a producer declared up front, plus any job
    -- that arrives naming the batch.
    redis.call('ZADD', members, tonumber(redis.call('HGET', jk, 'created_ts') or now), id)
  else
    redis.call('HINCRBY', bk, 'c:' .. cur, -1)
  end
  redis.call('HINCRBY', bk, 'c:' .. to, 1)
  if not (TERMINAL[to] or to == 'duplicate') or redis.call('HEXISTS', bk, 'event') == 1 then return nil end
  local total = redis.call('ZCARD', members)
  local counts, done = {}, 0
  local raw = redis.call('HGETALL', bk)
  for i = 1, #raw, 2 do
    if string.sub(raw[i], 1, 2) == 'c:' then
      local n = tonumber(raw[i + 1])
      if n ~= 0 then counts[string.sub(raw[i], 3)] = n end
      if TERMINAL[string.sub(raw[i], 3)] or raw[i] == 'c:duplicate' then done = done + n end
    end
  end
  if done < total then return nil end
  redis.call('HSET', bk, 'finished_ts', now, 'finished_at', now_iso)
  local event = cjson.encode({event = 'batch.finished', batch_id = b, total = total, counts = counts,
                              finished_at = now_iso})
  redis.call('HSET', bk, 'event', event)
  return event
end
"""

# KEYS: TRANSITION_KEYS, then one state index per STATE_ORDER entry.
# ARGV: tag, job_id, to, expected ("|"-joined, "" = no record), fields JSON, due ("" keep, "-"
#       remove, else score), event JSON or "", handlers JSON, now, inflight flag, retention seconds,
#       time the deliveries fall due, a counter to bump ("" none), operation id, "1" to put the job
#       in its ready queue, now as ISO-8601, the request body to store in the request key ("" = keep
#       what is there), the settlement of the job's open credit reservation ("" none, or on a terminal
#       move "auto"; "auto", "open" or a number: see settle in LIB), the operation id the record must
#       still hold for a chained move ("" = no such condition), and a rate-log member it also needs
#       ("" = none).
# The request key (KEYS[11]) follows the record: written here, given the record's TTL on a terminal
# move and made persistent again on any other.
# The operation id makes the script safe to run twice: a client that re-sends it after a socket
# timeout (the server was only slow) finds its own id on the record and gets "done", not a lost race.
TRANSITION = LIB + """
local jk, id, to, op = KEYS[1], ARGV[2], ARGV[3], ARGV[14]
local S = {""" + ", ".join(f"['{st.value}'] = {i + 1 + len(TRANSITION_KEYS)}" for i, st in enumerate(STATE_ORDER)) + """}
if op ~= '' and redis.call('HGET', jk, 'op') == op then return {1, to, 1} end
local cur = redis.call('HGET', jk, 'state') or ''
-- A move chained to an earlier one in the same round trip: only if nothing moved the job since that
-- one (the record still holds its op, ARGV[19]) and, when ARGV[20] names one, the rate log holds
-- that send (admission granted it a slot now).
if (ARGV[19] or '') ~= '' then
  if redis.call('HGET', jk, 'op') ~= ARGV[19] then return {0, cur, 0} end
  if (ARGV[20] or '') ~= '' and not redis.call('ZSCORE', KEYS[7], ARGV[20]) then return {0, cur, 0} end
end
local ok = false
for e in string.gmatch(ARGV[4] .. '|', '([^|]*)|') do
  if e == cur then ok = true end
end
-- A hash without a state (an idempotency duplicate's pointer) is a record all the same: a move
-- that expects none is refused on it.
if ok and cur == '' and redis.call('EXISTS', jk) == 1 then ok = false end
if not ok then return {0, cur, 0} end
local now = ARGV[9]
-- A progress event being delivered (jobs/progress.py) holds the result event back, for at most 30 s.
if TERMINAL[to] then
  local pending = tonumber(redis.call('HGET', jk, 'progress_pending') or '')
  if pending and tonumber(now) - pending < 30 then return {0, cur, 0} end
end
-- Settled before the fields are written: 'auto' asks whether the provider had accepted the job.
local sa = ARGV[18] or ''
if sa == '' and TERMINAL[to] then sa = 'auto' end
if sa ~= '' then settle(jk, sa) end
if cur == 'queued' and to ~= 'queued' then
  ready_remove(jk, id, KEYS[8])
  redis.call('ZREM', KEYS[6], id)
  -- A slot booked for a job that will not be sent now (cancelled, failed) is given back.
  if to ~= 'submitting' then
    local bm = 'b:' .. id .. ':' .. (tonumber(redis.call('HGET', jk, 'sends') or '0') + 1)
    redis.call('ZREM', KEYS[7], bm)
    redis.call('ZREM', KEYS[7] .. ':b', bm)
  end
end
local fields = cjson.decode(ARGV[5])
for k, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', jk, k) else redis.call('HSET', jk, k, v) end
end
if ARGV[17] ~= '' then
  redis.call('SET', KEYS[11], ARGV[17])
  redis.call('HDEL', jk, 'request')
end
redis.call('HSET', jk, 'state', to, 'state_ts', now, 'op', op)
-- A short history of the job's moves for the dashboard's timeline (the last HISTORY_MAX).
local hist = cjson.decode(redis.call('HGET', jk, 'history') or '[]')
table.insert(hist, {tonumber(now), cur, to})
while #hist > """ + str(HISTORY_MAX) + """ do table.remove(hist, 1) end
redis.call('HSET', jk, 'history', cjson.encode(hist))
local created = tonumber(redis.call('HGET', jk, 'created_ts') or now)
if cur ~= '' then redis.call('ZREM', KEYS[S[cur]], id) end
redis.call('ZADD', KEYS[S[to]], created, id)
if ARGV[10] == '1' then redis.call('SADD', KEYS[3], id) else redis.call('SREM', KEYS[3], id) end
if ARGV[6] == '-' then redis.call('ZREM', KEYS[2], id)
elseif ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[6], id) end
if to == 'queued' then
  if cur == '' then
    local na = redis.call('HGET', jk, 'not_after')
    if na then redis.call('ZADD', KEYS[6], na, id) end
  end
  if ARGV[15] == '1' then ready_add(jk, id, KEYS[8], KEYS[9]) end
end
local bevent = batch_move(jk, id, cur, to, now, ARGV[16])
local handlers = cjson.decode(ARGV[8])
if ARGV[7] ~= '' then
  redis.call('ZREM', KEYS[2], id)
  redis.call('HSET', jk, 'event', ARGV[7])
  for _, h in ipairs(handlers) do
    redis.call('HSET', jk, 'handler:' .. h, '{"state":"pending","attempts":0}')
    redis.call('ZADD', KEYS[4], ARGV[12], id .. '|' .. h)
  end
  redis.call('HINCRBY', KEYS[5], 'jobs_' .. to, 1)
  redis.call('EXPIRE', jk, ARGV[11])
  redis.call('EXPIRE', KEYS[11], ARGV[11])
else
  redis.call('PERSIST', jk)
  redis.call('PERSIST', KEYS[11])
end
if bevent then
  local b = redis.call('HGET', jk, 'batch_id')
  local bk = T .. ':batch:' .. b
  for _, h in ipairs(handlers) do
    redis.call('HSET', bk, 'handler:' .. h, '{"state":"pending","attempts":0}')
    redis.call('ZADD', KEYS[4], ARGV[12], '@batch:' .. b .. '|' .. h)
  end
  redis.call('HINCRBY', KEYS[5], 'batches_finished', 1)
end
if ARGV[13] ~= '' then redis.call('HINCRBY', KEYS[5], ARGV[13], 1) end
-- The dashboard's per-minute series (Keys.minute): submissions and finished jobs.
if ARGV[13] == 'submissions' or ARGV[7] ~= '' then
  local mk = T .. ':min:' .. math.floor(tonumber(now) / 60)
  if ARGV[13] == 'submissions' then redis.call('HINCRBY', mk, 'submitted', 1) end
  if ARGV[7] ~= '' then redis.call('HINCRBY', mk, 'finished', 1); redis.call('HINCRBY', mk, to, 1) end
  redis.call('EXPIRE', mk, """ + str(MINUTE_TTL) + """)
end
-- A successful generation resets the provider breaker's streak and closes it if open (as
-- Breaker.success does), in the same step: no extra round trip per job.
local bclosed = 0
if to == 'succeeded' and redis.call('EXISTS', KEYS[10]) == 1 then
  redis.call('HSET', KEYS[10], 'streak', 0)
  local bst = redis.call('HGET', KEYS[10], 'state')
  if bst and bst ~= 'closed' then
    redis.call('HSET', KEYS[10], 'state', 'closed', 'probe', '', 'closed_by', id)
    redis.call('HDEL', KEYS[10], 'until', 'since', 'cooldown')
    bclosed = 1
  end
end
return {1, cur, 0, bevent and 1 or 0, bclosed}
"""

# Put a queued job (not admitted) back in its ready queue. KEYS: job, priorities, seq. ARGV: tag, id.
READY = LIB + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HDEL', KEYS[1], 'admitted')
return ready_add(KEYS[1], ARGV[2], KEYS[2], KEYS[3])
"""

# Create an idempotency duplicate's pointer record unless the key exists; a batch counts it done.
# KEYS: job, deliveries, stats, request. ARGV: tag, id, ttl seconds, fields JSON, now, now ISO,
# handlers JSON, time the batch's deliveries fall due, the request body ("" = none).
POINTER = LIB + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[9] ~= '' then redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[3]) end
if batch_move(KEYS[1], ARGV[2], '', 'duplicate', ARGV[5], ARGV[6]) then
  local b = redis.call('HGET', KEYS[1], 'batch_id')
  for _, h in ipairs(cjson.decode(ARGV[7])) do
    redis.call('HSET', T .. ':batch:' .. b, 'handler:' .. h, '{"state":"pending","attempts":0}')
    redis.call('ZADD', KEYS[2], ARGV[8], '@batch:' .. b .. '|' .. h)
  end
  redis.call('HINCRBY', KEYS[3], 'batches_finished', 1)
end
return 1
"""
