"""Rate limits: token buckets per user, per channel and per client address.

Sends (the drop strategy): per user and per channel. Logins: per source
address, for every attempt, for new users, and for failed token checks (brute
force); and channels a user creates (``ClientLimits``).

A bucket of rate ``r`` gains ``r`` tokens a second and holds at most ``burst``
tokens: one second's worth (``r``, at least 1). A send takes a token; a send
that finds no token is refused (``rate_limited``) and not stored.

A bucket is kept as one number, the time at which it will be full again (the
generic cell rate algorithm: the same decisions as a token count plus a
timestamp). A full bucket needs no state, so an entry exists only while its
bucket is not full: at most about a second after its key's last send. The
table is rebuilt without those entries once a second (``purge``), so its
memory follows the keys that sent in the last second or so, not every user
or channel there is.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable, Hashable

from zim.pending import Pending
from zim.storage.store import StoreRefusal

MAX_RATE = 1_000_000.0      # messages per second: above this a limit means nothing
# Float sums of intervals (40 x 0.025 ...) land a hair above their exact value;
# without this slack the burst's last token could be refused.
_ROUNDING_SLACK = 1e-9


def check_rate(name: str, value: object) -> float:
    """``value`` as a rate in messages per second (0: off), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of messages per second, not {value!r}")
    rate = float(value)
    if not (math.isfinite(rate) and 0 <= rate <= MAX_RATE):
        raise ValueError(f"{name} must be between 0 (off) and {MAX_RATE:,.0f} messages per second, "
                         f"not {value!r}")
    return rate


class TokenBuckets:
    """One token bucket per key, ``rate`` tokens a second, burst ``burst_seconds`` worth
    (at least one token). A key's state is its *debt*: how long until its bucket is
    full again (the generic cell rate algorithm); ``take`` adds ``units / rate``."""

    __slots__ = ("rate", "burst", "interval", "_tolerance", "_full_at")

    def __init__(self, rate: float, burst_seconds: float = 1.0, max_rate: float = MAX_RATE) -> None:
        if not 0 < rate <= max_rate:
            raise ValueError(f"rate must be in (0, {max_rate:g}]")
        self.rate = rate
        self.burst = max(1.0, rate * burst_seconds)
        self.interval = 1.0 / rate          # seconds one token takes to come back
        # a send is allowed while the bucket holds a whole token, i.e. while it is
        # full again within (burst - 1) tokens' time
        self._tolerance = (self.burst - 1.0) * self.interval + _ROUNDING_SLACK
        self._full_at: dict[Hashable, float] = {}

    def __len__(self) -> int:
        """Buckets that are not full (the only ones stored)."""
        return len(self._full_at)

    def debt(self, key: Hashable, now: float) -> float:
        """Seconds until the key's bucket is full again (0 or less: full)."""
        return self._full_at.get(key, now) - now

    def has_token(self, key: Hashable, now: float) -> bool:
        return self.debt(key, now) <= self._tolerance

    def take(self, key: Hashable, now: float, units: float = 1.0) -> None:
        """Take ``units`` tokens (after ``has_token`` said there is one, or after the
        fact, for a cost known once the work is done)."""
        full_at = self._full_at.get(key, now)
        self._full_at[key] = (full_at if full_at > now else now) + units / self.rate

    def try_take(self, key: Hashable, now: float) -> bool:
        """Take a token if there is one; whether there was."""
        if not self.has_token(key, now):
            return False
        self.take(key, now)
        return True

    def purge(self, now: float) -> None:
        """Forget the buckets that are full by ``now``; a new table, so its memory shrinks too."""
        self._full_at = {key: full_at for key, full_at in self._full_at.items() if full_at > now}


class SendLimits:
    """The server's send limits: per user (actions 2 and 4) and per channel (action 4).

    A rate of 0 turns that limit off.
    """

    __slots__ = ("user_rate", "channel_rate", "users", "channels", "clock", "refused")

    def __init__(self, user_rate: float = 0, channel_rate: float = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.user_rate = check_rate("user_rate", user_rate)
        self.channel_rate = check_rate("channel_rate", channel_rate)
        self.users = TokenBuckets(self.user_rate) if self.user_rate else None
        self.channels = TokenBuckets(self.channel_rate) if self.channel_rate else None
        self.clock = clock
        self.refused = {"user": 0, "channel": 0}    # sends refused, by the bucket that refused them

    def refusal(self, user: str, channel: str | None = None) -> str | None:
        """Why a send by ``user`` (to ``channel``, for a channel message) is refused,
        or None: then it has taken its tokens. A refused send takes none."""
        users, channels = self.users, self.channels
        if users is None and (channels is None or channel is None):
            return None
        now = self.clock()
        if users is not None and not users.has_token(user, now):
            self.refused["user"] += 1
            return f"at most {self.user_rate:g} messages per second per user"
        if channels is not None and channel is not None and not channels.try_take(channel, now):
            self.refused["channel"] += 1
            return f"at most {self.channel_rate:g} messages per second in channel {channel}"
        if users is not None:
            users.take(user, now)
        return None

    def purge(self) -> None:
        """Drop the buckets that have refilled (call about once a second)."""
        now = self.clock()
        for buckets in (self.users, self.channels):
            if buckets is not None:
                buckets.purge(now)


# --------------------------------------------------------------- per client

ADDRESS_BURST_SECONDS = 10      # an address's buckets hold ten seconds' worth: a NAT's reconnect storm
CREATE_BURST_SECONDS = 10

DEFAULT_MAX_CONNS_PER_ADDRESS = 1000
DEFAULT_MAX_CONNS_PER_USER = 100
DEFAULT_ADDRESS_LOGIN_RATE = 100.0      # login attempts (action 1) a second per address
DEFAULT_ADDRESS_NEW_USER_RATE = 5.0     # users created a second per address
DEFAULT_ADDRESS_AUTH_FAILURE_RATE = 1.0     # failed token checks a second per address
DEFAULT_CHANNEL_CREATE_RATE = 1.0       # channels one user creates a second
DEFAULT_MAX_ACK_IDS = 1000              # ids in one ack (action 8)
DEFAULT_ACK_RATE = 2_000.0              # ids one user acks a second, bursts of one second's worth
DEFAULT_READ_RATE = 256 * 1024          # bytes of history and mailbox pages one user reads a second, ...
READ_BURST_SECONDS = 4                  # ... in bursts of four seconds' worth (an app's start: 1 MiB)
MAX_COUNT_LIMIT = 1 << 30
# JWT logins (zim.jwtauth; here, where the options read them without loading PyJWT)
DEFAULT_JWT_LEEWAY = 30                 # seconds: exp, nbf and iat tolerate clocks this far apart
DEFAULT_JWT_MAX_BYTES = 8 * 1024        # a longer token is refused before it is parsed


MAX_BYTE_RATE = float(1 << 40)


def check_byte_rate(name: str, value: object) -> float:
    """``value`` as bytes a second (0: off), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_BYTE_RATE:
        raise ValueError(f"{name} must be between 0 (off) and 1 TiB a second, not {value!r}")
    return float(value)


def check_count(name: str, value: object, low: int = 0) -> int:
    """``value`` as a count limit (0: off), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or low <= value <= MAX_COUNT_LIMIT):
        raise ValueError(f"{name} must be 0 (off) or an integer from {low} to {MAX_COUNT_LIMIT}, not {value!r}")
    return value


class ClientLimits:
    """What one client may do beyond sending (``SendLimits``); 0 turns a limit off.

    ``max_conns_per_address``: connections from one source address (an IPv6 client
    counts by its /64), over every worker; the reactor refuses the next one.
    ``max_conns_per_user``: logged-in connections of one user on this server; the
    next login is answered ``too_many_connections``.
    ``address_login_rate``, ``address_new_user_rate``, ``address_auth_failure_rate``:
    login attempts, new users, and failed token checks a second from one address
    (bursts of ten seconds' worth); excess is answered ``rate_limited`` (an address
    out of failures may not try a token at all until its bucket refills).
    ``channel_create_rate``: channels one user creates a second (bursts of ten
    seconds' worth). ``max_ack_ids``: ids in one ack (action 8), longer lists are
    ``bad_request``. ``ack_rate``: ids a second one user's acks may free;
    ``read_rate``: bytes of history and mailbox pages a second one user may read
    (bursts of ``READ_BURST_SECONDS``' worth).
    Requests past them wait (they are not refused), and one user's acks and reads
    reach the store one at a time (``PacedLine``), so a pipeline of them costs the
    server almost nothing.
    """

    __slots__ = ("max_conns_per_address", "max_conns_per_user", "address_login_rate",
                 "address_new_user_rate", "address_auth_failure_rate", "channel_create_rate", "max_ack_ids",
                 "ack_rate", "read_rate")

    def __init__(self, max_conns_per_address: int = DEFAULT_MAX_CONNS_PER_ADDRESS,
                 max_conns_per_user: int = DEFAULT_MAX_CONNS_PER_USER,
                 address_login_rate: float = DEFAULT_ADDRESS_LOGIN_RATE,
                 address_new_user_rate: float = DEFAULT_ADDRESS_NEW_USER_RATE,
                 address_auth_failure_rate: float = DEFAULT_ADDRESS_AUTH_FAILURE_RATE,
                 channel_create_rate: float = DEFAULT_CHANNEL_CREATE_RATE,
                 max_ack_ids: int = DEFAULT_MAX_ACK_IDS,
                 ack_rate: float = DEFAULT_ACK_RATE,
                 read_rate: float = DEFAULT_READ_RATE) -> None:
        self.max_conns_per_address = check_count("max_conns_per_address", max_conns_per_address)
        self.max_conns_per_user = check_count("max_conns_per_user", max_conns_per_user)
        self.address_login_rate = check_rate("address_login_rate", address_login_rate)
        self.address_new_user_rate = check_rate("address_new_user_rate", address_new_user_rate)
        self.address_auth_failure_rate = check_rate("address_auth_failure_rate", address_auth_failure_rate)
        self.channel_create_rate = check_rate("channel_create_rate", channel_create_rate)
        self.max_ack_ids = check_count("max_ack_ids", max_ack_ids)
        self.ack_rate = check_rate("ack_rate", ack_rate)
        self.read_rate = check_byte_rate("read_rate", read_rate)


def _buckets(rate: float, burst_seconds: float) -> TokenBuckets | None:
    return TokenBuckets(rate, burst_seconds) if rate else None


class ClientBuckets:
    """The handlers' side of ``ClientLimits``: one bucket per address or user and
    purpose, kept only while not full (``TokenBuckets``)."""

    __slots__ = ("limits", "logins", "new_users", "auth_failures", "creates", "clock", "refused")

    def __init__(self, limits: ClientLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.logins = _buckets(limits.address_login_rate, ADDRESS_BURST_SECONDS)
        self.new_users = _buckets(limits.address_new_user_rate, ADDRESS_BURST_SECONDS)
        self.auth_failures = _buckets(limits.address_auth_failure_rate, ADDRESS_BURST_SECONDS)
        self.creates = _buckets(limits.channel_create_rate, CREATE_BURST_SECONDS)
        self.clock = clock
        # refused, by the limit that refused: zim_rate_limited_total{scope=...}
        self.refused = {"address_login": 0, "address_new_user": 0, "address_auth_failure": 0,
                        "channel_create": 0}

    def _take(self, buckets: TokenBuckets | None, key: Hashable, scope: str) -> bool:
        if buckets is None or buckets.try_take(key, self.clock()):
            return True
        self.refused[scope] += 1
        return False

    def login_refusal(self, address: int | None, new_user: bool) -> str | None:
        """Why a login attempt from ``address`` is refused (None: go on; it took its tokens).
        ``address`` None: unknown (the attempt counts for no address)."""
        if address is None:
            return None
        if self.auth_failures is not None and not new_user \
                and not self.auth_failures.has_token(address, self.clock()):
            self.refused["address_auth_failure"] += 1
            return (f"too many failed token checks from this address: at most "
                    f"{self.limits.address_auth_failure_rate:g} a second")
        if not self._take(self.logins, address, "address_login"):
            return f"at most {self.limits.address_login_rate:g} logins a second from one address"
        if new_user and not self._take(self.new_users, address, "address_new_user"):
            return f"at most {self.limits.address_new_user_rate:g} new users a second from one address"
        return None

    def auth_failed(self, address: int | None) -> None:
        """A token from ``address`` failed its check: it takes a failure token."""
        if address is not None and self.auth_failures is not None:
            self.auth_failures.take(address, self.clock())

    def create_refusal(self, user_id: int) -> str | None:
        """Why ``user_id`` may not create a channel now (None: go on; it took its token)."""
        if not self._take(self.creates, user_id, "channel_create"):
            return f"at most {self.limits.channel_create_rate:g} new channels a second per user"
        return None

    def purge(self) -> None:
        """Drop the buckets that have refilled (call about once a second)."""
        now = self.clock()
        for buckets in (self.logins, self.new_users, self.auth_failures, self.creates):
            if buckets is not None:
                buckets.purge(now)


class Budget:
    """One kind of work a ``PacedLine`` paces: ``TokenBuckets`` per key, charged
    before (known costs) or after (costs known from the result); a key may start
    while it is at most ``burst_seconds`` in debt."""

    __slots__ = ("buckets", "burst_seconds")

    def __init__(self, rate: float, burst_seconds: float) -> None:
        self.buckets = TokenBuckets(rate, burst_seconds, max_rate=MAX_BYTE_RATE)    # ids or bytes a second
        self.burst_seconds = burst_seconds

    def ready(self, key: Any, now: float) -> bool:
        return self.buckets.debt(key, now) <= self.burst_seconds

    def charge(self, key: Any, now: float, units: float) -> None:
        if units > 0:
            self.buckets.take(key, now, units)


class Call:
    """A store call waiting in a ``PacedLine``."""

    __slots__ = ("start", "budget", "units", "cost", "wanted", "result")

    def __init__(self, start: Callable[[], Any], budget: Budget | None, units: int,
                 cost: Callable[[Any], float] | None, wanted: Callable[[], bool] | None) -> None:
        self.start = start
        self.budget = budget
        self.units = units          # charged as it starts
        self.cost = cost            # cost(value): charged once it succeeded
        self.wanted = wanted        # wanted(): False when its turn comes, it is not made
        self.result = Pending()


class NotWanted(StoreRefusal):
    """A call in a ``PacedLine`` nobody waits for any more (its client left): not
    made, and answered as a refusal (to no one), not logged as a store failure."""

    def __init__(self) -> None:
        super().__init__("gone", "the client left before its turn")


class PacedLine:
    """Store calls of one key (a user) reach the store one at a time, in order, each
    kind within its budget (``Budget``): ack ids (``--ack-rate``) and bytes of
    pages read (``--read-rate``).

    One user's pipelined acks and history reads wait here, in the process that
    runs handlers, rather than in the store writer's queue ahead of everybody
    else's messages: another user's write waits behind at most one of them. Past a
    budget they wait for ``release`` (once a second): the client's requests in
    flight pile up to ``--max-inflight`` and the server stops reading it, so it
    costs no more."""

    __slots__ = ("waiting", "parked", "clock", "budgets")

    def __init__(self, clock: Callable[[], float] = time.monotonic, **rates: float | tuple[float, float]) -> None:
        self.waiting: dict[Any, deque] = {}    # key -> calls not started yet (present: one is running)
        self.parked: dict[Any, Call] = {}       # key -> its next call, waiting for its budget
        self.clock = clock
        # rates checked by their owner (ClientLimits): units a second, or (units a second, burst seconds)
        self.budgets: dict[str, Budget] = {}
        for kind, rate in rates.items():
            rate, burst = rate if isinstance(rate, tuple) else (rate, 1.0)
            if rate:
                self.budgets[kind] = Budget(float(rate), burst)

    def call(self, key: Any, start: Callable[[], Any], kind: str = "", units: int = 0,
             cost: Callable[[Any], float] | None = None, wanted: Callable[[], bool] | None = None) -> Pending:
        """``start()`` (a store call) once the key's earlier calls have settled and
        its ``kind`` budget allows (``units`` charged then, ``cost(value)`` after);
        its result, as a Pending. A kind without a rate is not paced. If
        ``wanted()`` is false when its turn comes, the call is not made (it fails
        with ``NotWanted``): a read for a client that has left."""
        call = Call(start, self.budgets.get(kind), units, cost, wanted)
        line = self.waiting.get(key)
        if line is not None:
            line.append(call)
        else:
            self.waiting[key] = deque()
            self._run(key, call)
        return call.result

    def release(self) -> None:
        """Start the parked calls whose budget allows them now; forget idle budgets."""
        parked, self.parked = self.parked, {}
        for key, call in parked.items():
            self._run(key, call)
        now = self.clock()
        for budget in self.budgets.values():
            budget.buckets.purge(now)

    def _run(self, key: Any, call: Call | None) -> None:
        while call is not None:
            if call.wanted is not None and not call.wanted():
                call = self._finish(key, call, False, NotWanted())
                continue
            budget = call.budget
            if budget is not None:
                now = self.clock()
                if not budget.ready(key, now):
                    self.parked[key] = call
                    return
                budget.charge(key, now, call.units)
            try:
                value = call.start()
            except Exception as exc:       # noqa: BLE001 - the caller's handler answers it
                ok, value = False, exc
            else:
                if isinstance(value, Pending):
                    if value.outcome is None:
                        value.wait(self._settled, key, call)
                        return
                    ok, value = value.outcome
                else:
                    ok = True
            call = self._finish(key, call, ok, value)

    def _settled(self, key: Any, call: Call, ok: bool, value: Any) -> None:
        self._run(key, self._finish(key, call, ok, value))

    def _finish(self, key: Any, call: Call, ok: bool, value: Any) -> Call | None:
        """Settle ``call``; the key's next one (None: the key's line is empty)."""
        if ok and call.cost is not None and call.budget is not None:
            try:
                call.budget.charge(key, self.clock(), call.cost(value))
            except Exception:          # noqa: BLE001 - a cost is an estimate; never fail the call
                pass
        line = self.waiting[key]
        following = line.popleft() if line else None
        if following is None:
            del self.waiting[key]
        call.result.settle(ok, value)
        return following
