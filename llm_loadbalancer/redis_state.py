"""The state of balancers kept in a Redis server, shared by every machine that uses it.

The same operations as ``state.py`` (select, claim, finish, record, reset, stats), with the same
meaning; the choice itself is ``selection.choose``, in Python, for both. A selection is two round
trips: one script reads everything the choice needs (and the server's clock: every machine
uses the server's time, so their own clocks need not agree), Python chooses, and a second
script stores the choice only if nothing changed since the read (its ``version``); when
something did, another process chose in between, and the selection is made again from a new
read. Recording an attempt is one script: one round trip.

Every key of a balancer starts with ``llm-lb:<digest>:``, the digest of its name and member
list: two definitions under one name never share a rotation or a limit. Keys expire after
KEEP_DAYS without use. redis-py is imported only here, when a balancer uses Redis.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time

from .config import MAX_SECONDS, Balancer, shown_url
from .limits import WINDOWS
from .selection import choose, counted_ahead, free_at, in_flight, median_latency, of_kind
from .state import Choice, StateUnavailable, alive, shape_stats, timeout

CONNECT_TIMEOUT = 0.25  # seconds to connect, at most
TIMEOUT = 0.5  # seconds for one reply, at most
KEEP_DAYS = 30  # a balancer's keys expire after this long without use (as ties do in SQLite)
RECENT = 100  # the timings kept per member (statistics, lowest-latency)
DAY = 86400

# What a choice needs, read in one go: ``a[o]`` members, ``a[o + 1]`` conversation or '',
# ``a[o + 2]`` want in flight (0/1), ``a[o + 3]`` want timings (0/1), then for each member with
# limits: its index, its windows (seconds, comma-separated), tokens (0/1). Gives version,
# position, cooldowns (flat hash), tie, in flight (flat hash), timings per member, per limited
# member and window its requests and tokens, and the server's time.
SNAPSHOT = """
local function snapshot(p, a, o)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local out = {}
  out[1] = redis.call('GET', p .. 'version') or '0'
  out[2] = redis.call('HGET', p .. 'rotation', 'position') or '0'
  out[3] = redis.call('HGETALL', p .. 'cooldowns')
  out[4] = ''
  if a[o + 1] ~= '' then out[4] = redis.call('HGET', p .. 'ties', a[o + 1]) or '' end
  out[5] = {}
  if a[o + 2] == '1' then out[5] = redis.call('HGETALL', p .. 'flight') end
  local timings = {}
  if a[o + 3] == '1' then
    for i = 0, tonumber(a[o]) - 1 do
      timings[#timings + 1] = redis.call('LRANGE', p .. 'timings:' .. i, 0, -1)
    end
  end
  out[6] = timings
  local totals = {}
  local i = o + 4
  while i + 2 <= #a do
    local m, tokens = a[i], a[i + 2] == '1'
    local newest = 0
    if tokens then
      local top = redis.call('ZREVRANGE', p .. 'spent:' .. m, 0, 0)
      if #top > 0 then newest = tonumber(string.match(top[1], '^(%d+)')) end
    end
    for w in string.gmatch(a[i + 1], '[^,]+') do
      local start = '(' .. string.format('%.6f', now - tonumber(w))
      totals[#totals + 1] = tostring(redis.call('ZCOUNT', p .. 'requests:' .. m, start, '+inf'))
      local used = 0
      if tokens then
        local first = redis.call('ZRANGEBYSCORE', p .. 'spent:' .. m, start, '+inf', 'LIMIT', 0, 1)
        if #first > 0 then
          local cum, spent = string.match(first[1], '^(%d+):(%d+)')
          used = newest - (tonumber(cum) - tonumber(spent))
        end
      end
      totals[#totals + 1] = string.format('%d', used)
    end
    i = i + 3
  end
  out[7] = totals
  out[8] = string.format('%.6f', now)
  return out
end
"""

# ARGV: prefix, then what SNAPSHOT reads.
READ = (
    SNAPSHOT
    + """
return snapshot(ARGV[1], ARGV, 2)
"""
)

# A change that a choice depends on. The version never takes a value it had before, even after
# a reset deleted it: a new one starts at the server's time in microseconds, so that a choice
# made from an old snapshot is always refused.
BUMP = """
local function bump(p, keep)
  local key = p .. 'version'
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('INCR', key)
  redis.call('EXPIRE', key, keep)
end
"""

# A field of a hash, with the time it was set in the sorted set KEY_at, so that the fields set
# before ``older`` can be deleted, a hundred at a time (a hash has no expiry per field).
PUT_DATED = """
local function put_dated(key, field, value, at, older, keep)
  local dates = key .. '_at'
  redis.call('HSET', key, field, value)
  redis.call('ZADD', dates, at, field)
  local old = string.format('%.6f', older)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', dates, '-inf', old, 'LIMIT', 0, 100)) do
    redis.call('HDEL', key, gone)
    redis.call('ZREM', dates, gone)
  end
  redis.call('EXPIRE', key, keep)
  redis.call('EXPIRE', dates, keep)
end
"""

# ARGV: prefix, the version read, new position or '', member to count a request for or '',
# in flight (0/1), host, pid, time, seconds to keep, then what SNAPSHOT reads. When the version
# changed since the read: {0, a new snapshot}; otherwise {1, the request's ticket ('' without
# one), the snapshot after it}.
COMMIT = (
    SNAPSHOT
    + PUT_DATED
    + BUMP
    + """
local p = ARGV[1]
if (redis.call('GET', p .. 'version') or '0') ~= ARGV[2] then
  return {0, snapshot(p, ARGV, 10)}
end
local keep = tonumber(ARGV[9])
bump(p, keep)
if ARGV[3] ~= '' then
  redis.call('HSET', p .. 'rotation', 'position', ARGV[3])
  redis.call('EXPIRE', p .. 'rotation', keep)
end
local ticket = ''
if ARGV[4] ~= '' then
  local m, now = ARGV[4], ARGV[8]
  ticket = tostring(redis.call('INCR', p .. 'ids'))
  redis.call('EXPIRE', p .. 'ids', keep)
  local requests = p .. 'requests:' .. m
  redis.call('ZADD', requests, now, ticket)
  redis.call('ZREMRANGEBYSCORE', requests, '-inf', string.format('%.6f', tonumber(now) - 86400))
  redis.call('EXPIRE', requests, keep)
  if ARGV[5] == '1' then
    -- prompts in flight for longer than an hour no longer count: their processes were killed
    local entry = m .. '|' .. ARGV[6] .. '|' .. ARGV[7] .. '|' .. now
    put_dated(p .. 'flight', ticket, entry, now, tonumber(now) - 3600, keep)
  end
end
return {1, ticket, snapshot(p, ARGV, 10)}
"""
)

# ARGV: prefix, member, ticket or '', ok (0/1), error, cooldown, known (0/1), cooled (0/1),
# conversation or '', tokens in, tokens out, first chunk or '', total or '', streamed (0/1),
# counts tokens (0/1), time or '' (the server's), seconds to keep, longest cooldown, timings kept,
# items (of an embedding batch), then what SNAPSHOT reads, or nothing. The snapshot after it
# (or 1 without).
RECORD = (
    SNAPSHOT
    + PUT_DATED
    + BUMP
    + """
local p, m = ARGV[1], ARGV[2]
local now = tonumber(ARGV[16])
if ARGV[16] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local at = string.format('%.6f', now)
local keep = tonumber(ARGV[17])
local ok = ARGV[4] == '1'
local stats = p .. 'stats'
redis.call('HINCRBY', stats, m .. ':requests', 1)
if ok then
  redis.call('HINCRBY', stats, m .. ':successes', 1)
else
  redis.call('HINCRBY', stats, m .. ':failures', 1)
  redis.call('HSET', stats, m .. ':last_error', ARGV[5])
end
redis.call('HSET', stats, m .. ':last_used', at)
redis.call('HINCRBY', stats, m .. ':input_tokens', ARGV[10])
redis.call('HINCRBY', stats, m .. ':output_tokens', ARGV[11])
redis.call('HINCRBY', stats, m .. ':items', ARGV[20])
redis.call('EXPIRE', stats, keep)
local timings = p .. 'timings:' .. m
redis.call('LPUSH', timings, at .. '|' .. ARGV[12] .. '|' .. ARGV[13] .. '|' .. ARGV[14])
redis.call('LTRIM', timings, 0, tonumber(ARGV[19]) - 1)
redis.call('EXPIRE', timings, keep)
local spent = tonumber(ARGV[10]) + tonumber(ARGV[11])
local changed = false  -- what a choice depends on: tokens against a limit, cooldowns, ties
if ARGV[15] == '1' and spent > 0 then
  changed = true
  local key = p .. 'spent:' .. m
  local top = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  local cum, when = spent, now
  if #top > 0 then
    cum = tonumber(string.match(top[1], '^(%d+)')) + spent
    when = math.max(now, tonumber(top[2]))
  end
  redis.call('ZADD', key, string.format('%.6f', when), string.format('%020d:%d', cum, spent))
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.6f', now - 86400))
  redis.call('EXPIRE', key, keep)
end
if ARGV[3] ~= '' and redis.call('HDEL', p .. 'flight', ARGV[3]) == 1 then
  redis.call('ZREM', p .. 'flight_at', ARGV[3])
  changed = true
end
local cooldown = tonumber(ARGV[6])
local cooldowns = p .. 'cooldowns'
if cooldown > 0 then
  local row = redis.call('HGET', cooldowns, m)
  if row then
    local length = tonumber(string.match(row, '^[^|]*|[^|]*|([^|]*)'))
    cooldown = math.max(cooldown, 2 * length)
  end
  cooldown = math.min(cooldown, tonumber(ARGV[18]))
  redis.call('HSET', cooldowns, m, string.format('%.6f', now + cooldown) .. '|' .. ARGV[7]
    .. '|' .. string.format('%.6f', cooldown) .. '|' .. ARGV[5])
  redis.call('EXPIRE', cooldowns, keep)
  changed = true
elseif ok and ARGV[8] == '1' then
  if redis.call('HDEL', cooldowns, m) == 1 then changed = true end
end
if ok and ARGV[9] ~= '' then
  local ties = p .. 'ties'
  local first = m
  local row = redis.call('HGET', ties, ARGV[9])
  if row then first = string.match(row, '^(%d+)') end
  -- ties not used for 30 days are forgotten
  put_dated(ties, ARGV[9], first .. '|' .. m .. '|' .. at, at, now - keep, keep)
  changed = true
end
if changed then
  bump(p, keep)
end
if #ARGV > 20 then return snapshot(p, ARGV, 21) end
return 1
"""
)


# ARGV: prefix, ticket, seconds to keep. A prompt no longer in flight.
FINISH = (
    BUMP
    + """
local p = ARGV[1]
if redis.call('HDEL', p .. 'flight', ARGV[2]) == 1 then
  redis.call('ZREM', p .. 'flight_at', ARGV[2])
  bump(p, tonumber(ARGV[3]))
end
return 1
"""
)


class Busy(StateUnavailable):
    "Every try to store a choice was overtaken by another process's, for too long."

    what = "Redis state"


class Unreachable(Exception):
    "The Redis server cannot be used (down, refused, wrong password, redis-py missing)."


class RedisState:
    "The state of the balancers that name one Redis server, through one connection."

    def __init__(self, url: str, password: str | None = None):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise Unreachable(
                "redis-py is not installed: pip install 'llm-loadbalancer[redis]' "
                "(or llm install 'llm-loadbalancer[redis]')"
            ) from None
        self.url = url
        self.errors = (redis.exceptions.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # a server that fails is left for this process
            decode_responses=True,
        )
        self.host = socket.gethostname()
        self.read = self.client.register_script(READ)
        self.commit = self.client.register_script(COMMIT)
        self.recorder = self.client.register_script(RECORD)
        self.finisher = self.client.register_script(FINISH)
        # prefix: (the last snapshot this process received, when, by time.monotonic())
        self._snapshots: dict = {}

    def _call(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except self.errors as ex:
            raise Unreachable(f"{shown_url(self.url)}: {type(ex).__name__}: {ex}") from ex

    @staticmethod
    def prefix(balancer: Balancer) -> str:
        digest = hashlib.sha256(f"{balancer.name}\n{balancer.signature}".encode()).hexdigest()
        return f"llm-lb:{digest[:24]}:"

    # --- choosing -----------------------------------------------------------------------------

    def _read_args(self, balancer, conversation="", only=None) -> tuple[list, list[int]]:
        """What SNAPSHOT reads for a choice (in flight and timings as the policy needs them; the
        window totals of the members with limits, or of ``only``), and those members."""
        policy = balancer.policy
        args = [len(balancer.members), conversation or "", int(policy == "least-busy")]
        args.append(int(policy == "lowest-latency"))
        included = [
            index
            for index, member in enumerate(balancer.members)
            if member.limits and (only is None or index == only)
        ]
        for index in included:
            member = balancer.members[index]
            windows = ",".join(f"{window:g}" for window in _windows(member))
            args += [index, windows, int(bool(of_kind(member.limits, "t")))]
        return args, included

    def _speculates(self, balancer, conversation) -> bool:
        """Whether a choice may start from the snapshot this process last received, instead of
        a read: when it needs no conversation tie (which differs from prompt to prompt) and no
        member has limits (whose window totals are taken at the snapshot's time). The time is
        then the snapshot's, plus what passed since on this machine's monotonic clock."""
        return not conversation and not any(member.limits for member in balancer.members)

    def select(
        self,
        balancer: Balancer,
        *,
        conversation: str | None = None,
        tool_turn: bool = False,
        unavailable: frozenset[int] = frozenset(),
        stream: bool = True,
        rng=None,
        now: float | None = None,
    ):
        prefix = self.prefix(balancer)
        asks_tie = conversation if conversation and (tool_turn or balancer.sticky) else ""
        read_args, included = self._read_args(balancer, asks_tie)
        speculates = self._speculates(balancer, asks_tie)
        raw = self._snapshots.get(prefix) if speculates else None
        overtaken = _Overtaken(self.url, "selection")
        while True:
            if raw is None:
                raw = (self._call(self.read, args=[prefix, *read_args]), time.monotonic())
            known = _Known(self, balancer, raw, included, now)
            if balancer.policy == "lowest-latency":
                known.latency = known.latencies(stream)
            result = choose(
                balancer,
                known,
                tool_turn=tool_turn,
                unavailable=unavailable,
                rng=rng,
                now=known.now,
            )
            first = result.order[0] if result.order else None
            counted = first is not None and counted_ahead(balancer, first)
            moved = result.position != known.position
            if not moved and not counted:  # nothing to store: the read was the choice
                return Choice(result, None, known.cooled, known.now)
            reply = self._commit(
                balancer,
                known.version,
                read_args,
                position=result.position if moved else None,
                member=first if counted else None,
                now=known.now,
            )
            if reply[0] == 1:
                if speculates:
                    self._snapshots[prefix] = (reply[2], time.monotonic())
                return Choice(result, reply[1] or None, known.cooled, known.now)
            raw = overtaken.again(reply[1])

    def _commit(self, balancer, version, read_args, *, position=None, member=None, now):
        """Store a choice made from the snapshot of ``version``: [1, its ticket ('' without),
        the snapshot after it], or [0, a new snapshot] when the version moved since."""
        args = [
            self.prefix(balancer),
            version,
            "" if position is None else position,
            "" if member is None else member,
            int(balancer.policy == "least-busy"),
            self.host,
            os.getpid(),
            f"{now:.6f}",
            KEEP_DAYS * DAY,
            *read_args,
        ]
        return self._call(self.commit, args=args)

    def claim(self, balancer: Balancer, member: int, now: float | None = None):
        "As ``state.claim``: the member's ticket when it has room, or None (skip it)."
        prefix = self.prefix(balancer)
        read_args, included = self._read_args(balancer, only=member)
        overtaken = _Overtaken(self.url, "claim")
        raw = None
        while True:
            if raw is None:
                raw = (self._call(self.read, args=[prefix, *read_args]), time.monotonic())
            known = _Known(self, balancer, raw, included, now)
            if member in known.blocked or free_at(balancer, known, member, known.now) is not None:
                return None
            reply = self._commit(balancer, known.version, read_args, member=member, now=known.now)
            if reply[0] == 1:
                return reply[1]
            raw = overtaken.again(reply[1])

    # --- recording ----------------------------------------------------------------------------

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        "A prompt that ended without a record (the caller stopped reading): not in flight."
        self._call(self.finisher, args=[self.prefix(balancer), ticket, KEEP_DAYS * DAY])

    def record(
        self,
        balancer: Balancer,
        member: int,
        *,
        ticket=None,
        error: str | None = None,
        cooldown: float | None = None,
        known: bool = False,
        cooled: bool = True,
        conversation: str | None = None,
        tokens: tuple[int | None, int | None] = (None, None),
        first_chunk: float | None = None,
        total: float | None = None,
        streamed: bool = True,
        items: int = 0,
        now: float | None = None,
    ) -> None:
        tokens_in, tokens_out = (int(count or 0) for count in tokens)
        args = [
            self.prefix(balancer),
            member,
            "" if ticket is None else ticket,
            int(error is None),
            error or "",
            f"{cooldown or 0:.6f}",
            int(known),
            int(cooled),
            conversation or "",
            tokens_in,
            tokens_out,
            "" if first_chunk is None else f"{first_chunk:.6f}",
            "" if total is None else f"{total:.6f}",
            int(streamed),
            int(bool(of_kind(balancer.members[member].limits, "t"))),
            "" if now is None else f"{now:.6f}",
            KEEP_DAYS * DAY,
            f"{MAX_SECONDS:g}",
            RECENT,
            int(items or 0),
        ]
        speculates = self._speculates(balancer, "")
        if speculates:
            args += self._read_args(balancer)[0]
        reply = self._call(self.recorder, args=args)
        if speculates:
            self._snapshots[args[0]] = (reply, time.monotonic())

    def reset(self, balancer: Balancer) -> None:
        "Forget the rotation, cooldowns, ties, limits and statistics: for every machine."
        prefix = self.prefix(balancer)
        keys = [prefix + name for name in ("version", "rotation", "cooldowns", "stats", "ties")]
        keys += [prefix + name for name in ("ties_at", "flight", "flight_at", "ids")]
        for index in range(len(balancer.members)):
            keys += [prefix + f"{kind}:{index}" for kind in ("requests", "spent", "timings")]
        self._call(self.client.delete, *keys)

    # --- looking ------------------------------------------------------------------------------

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        prefix = self.prefix(balancer)
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(prefix + "stats")
        pipe.hgetall(prefix + "cooldowns")
        for index in range(len(balancer.members)):
            pipe.lrange(prefix + f"timings:{index}", 0, -1)
            pipe.zrangebyscore(prefix + f"requests:{index}", "-inf", "+inf", withscores=True)
            pipe.zrangebyscore(prefix + f"spent:{index}", "-inf", "+inf", withscores=True)
        server_time, counters, cooldowns, *per_member = self._call(pipe.execute)
        now = server_time[0] + server_time[1] / 1e6 if now is None else now
        rows, cooling, events, timings = {}, {}, {}, {}
        for index, member in enumerate(balancer.members):
            got = {
                name: counters.get(f"{index}:{name}")
                for name in (
                    "requests",
                    "successes",
                    "failures",
                    "last_used",
                    "last_error",
                    "input_tokens",
                    "output_tokens",
                    "items",
                )
            }
            if got["requests"] is not None:
                rows[index] = (
                    int(got["requests"]),
                    int(got["successes"] or 0),
                    int(got["failures"] or 0),
                    float(got["last_used"]) if got["last_used"] else None,
                    got["last_error"],
                    int(got["input_tokens"] or 0),
                    int(got["output_tokens"] or 0),
                    int(got["items"] or 0),
                )
            row = cooldowns.get(str(index))
            if row:
                until, known, _, reason = row.split("|", 3)
                if float(until) > now:
                    cooling[index] = (float(until), reason, known == "1")
            recent, requests, spent = per_member[3 * index : 3 * index + 3]
            timings[index] = [
                (timing[1], timing[2]) for timing in map(_timing, recent) if timing[2]
            ]
            if member.limits:
                events[index] = (
                    [(at, 0) for _, at in requests if at > now - DAY],
                    [(at, int(entry.split(":")[1])) for entry, at in spent if at > now - DAY],
                )
        return shape_stats(balancer, rows, cooling, events, timings, now)

    def check(self) -> dict:
        "Ping the server: its version and the round trip, in seconds; raises Unreachable."
        self._call(self.client.ping)  # connects
        started = time.perf_counter()
        self._call(self.client.ping)
        trip = time.perf_counter() - started
        info = self._call(self.client.info, "server")
        return {"redis_version": info.get("redis_version"), "round_trip": trip}

    def found(self, balancer: Balancer) -> dict:
        "What the server holds for this definition of the balancer."
        prefix = self.prefix(balancer)
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(prefix + "version")
        pipe.hget(prefix + "rotation", "position")
        pipe.hgetall(prefix + "stats")
        pipe.hlen(prefix + "cooldowns")
        exists, position, counters, cooldowns = self._call(pipe.execute)
        requests = sum(int(v) for k, v in counters.items() if k.endswith(":requests"))
        return {
            "prefix": prefix,
            "known": bool(exists),
            "position": int(position or 0),
            "requests": requests,
            "cooldowns": cooldowns,
        }


def _timing(entry: str):
    "(at, first chunk, total, streamed) from a stored 'at|first|total|streamed'."
    at, first, total, streamed = entry.split("|")
    return (
        float(at),
        float(first) if first else None,
        float(total) if total else None,
        streamed == "1",
    )


class _Overtaken:
    """What to do when another process stored its choice between this one's snapshot and its
    store (or the snapshot kept from this process's last prompt was not the latest): the first
    time, choose again at once from the fresh snapshot that came with the refusal; after that,
    after a short random pause (growing to 50 ms), from a new read; for as long as the state
    file would wait for its lock (LLM_LOADBALANCER_STATE_TIMEOUT), then ``Busy``: the prompt is
    chosen without the shared state, with a warning."""

    def __init__(self, url: str, what: str):
        self.url, self.what, self.times = url, what, 0
        self.limit = timeout()
        self.deadline = time.monotonic() + self.limit

    def again(self, snapshot):
        "The snapshot to choose from next ((reply, when it came), or None: read again)."
        self.times += 1
        if self.times == 1:
            return (snapshot, time.monotonic())
        if time.monotonic() > self.deadline:
            raise Busy(
                f"{shown_url(self.url)}: too busy: every {self.what} was overtaken by another "
                f"process's for {self.limit:g} s"
            )
        time.sleep(random.uniform(0, min(0.0005 * 2**self.times, 0.05)))
        return None


class _Known:
    "What the server knew at one read (``selection.Known``)."

    def __init__(self, store: RedisState, balancer: Balancer, raw, included: list[int], now):
        (version, position, cooldowns, tie, flight, timings, totals, server_now), arrived = raw
        self.store, self.balancer = store, balancer
        self.version = version
        self.position = int(position)
        # the server's time, moved on by what passed since the snapshot came (``now``: a test's)
        self.now = float(server_now) + (time.monotonic() - arrived) if now is None else now
        self.cooling, self.blocked = {}, {}
        cooled = set()
        for index, row in zip(cooldowns[::2], cooldowns[1::2]):
            until, known, _, _ = row.split("|", 3)
            cooled.add(int(index))
            if float(until) > self.now:
                target = self.blocked if known == "1" else self.cooling
                target[int(index)] = min(float(until), self.now + MAX_SECONDS)
        self.cooled = frozenset(cooled)
        self.tie = tuple(int(x) for x in tie.split("|")[:2]) if tie else None
        self.busy = None
        if balancer.policy == "least-busy":
            entries = []
            for value in flight[1::2]:
                member, host, pid, at = value.split("|")
                local = host == store.host
                entries.append((int(member), float(at), (local, int(pid))))
            self.busy = in_flight(entries, self.now, _alive)
        self.timings = [[_timing(entry) for entry in member] for member in timings]
        self.latency = None
        self._totals = {}
        numbers = iter(int(value) for value in totals)
        for index in included:
            windows = _windows(balancer.members[index])
            self._totals[index] = {window: (next(numbers), next(numbers)) for window in windows}

    def latencies(self, stream: bool) -> dict[int, float]:
        found = {}
        for index, timings in enumerate(self.timings):
            median = median_latency(timings, self.now, stream)
            if median is not None:
                found[index] = median
        return found

    def totals(self, member: int) -> dict[float, tuple[int, int]]:
        return self._totals[member]

    def events(self, member: int, since: float):
        prefix = self.store.prefix(self.balancer)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.zrangebyscore(prefix + f"requests:{member}", f"({since:.6f}", "+inf", withscores=True)
        pipe.zrangebyscore(prefix + f"spent:{member}", f"({since:.6f}", "+inf", withscores=True)
        requests, spent = self.store._call(pipe.execute)
        return (
            [(at, 0) for _, at in requests],
            [(at, int(entry.split(":")[1])) for entry, at in spent],
        )


def _alive(process) -> bool:
    "A prompt in flight on another machine counts until it is old; on this one, while it runs."
    local, pid = process
    if not local:
        return True
    return alive(pid)


def _windows(member) -> list[float]:
    "The windows of a member's limits, in seconds, shortest first."
    return sorted({WINDOWS[name] for name in member.limits})
