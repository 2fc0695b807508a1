"""The C tables of channels, memberships and creators (zim._tables) against a plain Python model."""
from __future__ import annotations

import copy

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zim._tables import Tables

# few names and ids, so that operations meet; the empty name, non-ASCII ones, a lone surrogate
# and long ones (300 bytes: two-byte lengths in the name arena) included
LONG_NAMES = ["é" * 150, "名前" * 50]
channels = st.sampled_from(["", "a", "b", "général", "ch-3", "ch-4", "x" * 40, "日本", "\ud800lone", *LONG_NAMES])
# a crowd of one-member channels, so that deletions leave holes in the name arena and compact it
crowd = [f"crowd-{i}" + "ü" * (i % 7) * 20 for i in range(24)]
users = st.integers(1, 30) | st.sampled_from([2**64 - 1, 2**63, 2**32 + 1])


class TablesMatchAModel(RuleBasedStateMachine):
    """Every operation on the tables and on a dict model gives the same answers,
    and after each step the whole content is the same (and the C invariants hold)."""

    @initialize(initial=st.sampled_from([1, 2, 64]))
    def start(self, initial: int) -> None:
        self.tables = Tables(initial)                       # tiny: arrays and hashes grow often
        self.members: dict[str, dict[int, bool]] = {}       # channel -> {user id: push}
        self.private: set[str] = set()
        self.creators: dict[str, int] = {}                  # channel -> its creator (when known)

    # -- the model's side of each operation: the answer the tables must give --
    def model_subscribe(self, channel: str, user: int, push: bool) -> bool | None:
        members = self.members.setdefault(channel, {})
        previous = members.get(user)
        members[user] = push
        return previous

    def model_unsubscribe(self, channel: str, user: int) -> bool | None:
        return self.members.get(channel, {}).pop(user, None)

    def model_delete(self, channel: str) -> list[int] | None:
        self.private.discard(channel)
        self.creators.pop(channel, None)
        members = self.members.pop(channel, None)
        return None if members is None else sorted(members)

    def model_drop(self, channel: str) -> bool:
        if channel in self.members and not self.members[channel]:
            del self.members[channel]
            self.private.discard(channel)
            self.creators.pop(channel, None)
            return True
        return False

    # -- rules ------------------------------------------------------------------
    @rule(channel=channels, user=users, push=st.booleans())
    def subscribe(self, channel: str, user: int, push: bool) -> None:
        assert self.tables.subscribe(channel, user, push) == self.model_subscribe(channel, user, push)

    @rule(channel=channels, first=st.integers(1000, 5000), count=st.integers(1, 300), push=st.booleans())
    def many_join(self, channel: str, first: int, count: int, push: bool) -> None:
        for user in range(first, first + count):
            assert self.tables.subscribe(channel, user, push) == self.model_subscribe(channel, user, push)

    @rule(channel=channels, user=users)
    def unsubscribe(self, channel: str, user: int) -> None:
        assert self.tables.unsubscribe(channel, user) == self.model_unsubscribe(channel, user)

    @rule(channel=channels, step=st.integers(1, 3))
    def many_leave(self, channel: str, step: int) -> None:
        for user in sorted(self.members.get(channel, {}))[::step]:
            assert self.tables.unsubscribe(channel, user) == self.model_unsubscribe(channel, user)

    @rule(user=users, count=st.integers(1, len(crowd)))
    def crowd_joins(self, user: int, count: int) -> None:
        for channel in crowd[:count]:
            assert self.tables.subscribe(channel, user, False) == self.model_subscribe(channel, user, False)

    @rule(step=st.integers(1, 4), start=st.integers(0, 3))
    def crowd_deleted(self, step: int, start: int) -> None:
        for channel in crowd[start::step]:
            deleted = self.tables.delete_channel(channel)
            assert (None if deleted is None else sorted(deleted)) == self.model_delete(channel)

    @rule(channel=channels)
    def add_channel(self, channel: str) -> None:
        assert self.tables.add_channel(channel) == (channel not in self.members)
        self.members.setdefault(channel, {})

    @rule(channel=channels)
    def drop_channel(self, channel: str) -> None:
        assert self.tables.drop_channel(channel) == self.model_drop(channel)

    @rule(channel=channels)
    def delete_channel(self, channel: str) -> None:
        deleted = self.tables.delete_channel(channel)
        assert (None if deleted is None else sorted(deleted)) == self.model_delete(channel)

    @rule(user=users | st.integers(1000, 5000))
    def remove_user(self, user: int) -> None:
        left = [channel for channel, members in self.members.items() if members.pop(user, None) is not None]
        assert sorted(self.tables.remove_user(user)) == sorted(left)

    @precondition(lambda self: self.members)
    @rule(data=st.data(), private=st.booleans())
    def set_private(self, data, private: bool) -> None:
        channel = data.draw(st.sampled_from(sorted(self.members)))
        self.tables.set_private(channel, private)
        (self.private.add if private else self.private.discard)(channel)

    @precondition(lambda self: self.members)
    @rule(data=st.data(), creator=users | st.just(0))
    def set_creator(self, data, creator: int) -> None:
        """Any user, a member or not (then held for its count alone); 0: not known."""
        channel = data.draw(st.sampled_from(sorted(self.members)))
        self.tables.set_creator(channel, creator)
        if creator:
            self.creators[channel] = creator
        else:
            self.creators.pop(channel, None)

    @rule(batch=st.lists(st.tuples(st.sampled_from(["subscribe", "unsubscribe", "delete"]),
                                   channels, users, st.booleans()), min_size=1, max_size=8))
    def failed_batch_is_undone(self, batch) -> None:
        """Apply a batch, then undo it newest first as zim.storage.durable does when the
        writer fails: the old state comes back by re-applying it through the same calls."""
        tables = self.tables
        before = self.content()
        undos = []
        for op, channel, user, push in batch:
            existed = tables.channel_exists(channel)
            if op == "subscribe":
                old = tables.subscribe(channel, user, push)
                undos.append(lambda c=channel, u=user, o=old, e=existed: (
                    tables.subscribe(c, u, o) if o is not None
                    else (tables.unsubscribe(c, u), None if e else tables.drop_channel(c))))
            elif op == "unsubscribe":
                old = tables.unsubscribe(channel, user)
                if old is not None:
                    undos.append(lambda c=channel, u=user, o=old: tables.subscribe(c, u, o))
            elif existed:
                private, creator = tables.private(channel), tables.creator(channel)
                memberships = [(member, tables.membership(channel, member))
                               for member in tables.channel_members(channel)]
                tables.delete_channel(channel)
                undos.append(lambda c=channel, m=memberships, p=private, k=creator: (
                    tables.add_channel(c), tables.set_private(c, p), tables.set_creator(c, k or 0),
                    [tables.subscribe(c, u, push) for u, push in m]))
        for undo in reversed(undos):
            undo()
        assert self.content() == before

    @rule()
    def copied(self) -> None:
        """A deep copy (MemoryStore's tests copy stores) is exact and independent."""
        before = self.content()
        orders = [self.tables.channel_members(name) for name in sorted(self.tables.channel_names())]
        original, self.tables = self.tables, copy.deepcopy(self.tables)
        original.subscribe("only-in-the-original", 1, True)
        original.delete_channel("a")
        assert self.content() == before
        assert [self.tables.channel_members(name) for name in sorted(self.tables.channel_names())] == orders

    # -- the whole content, compared after every step -----------------------------
    def content(self):
        tables = self.tables
        names = sorted(tables.channel_names())
        return (names,
                {name: sorted((u, tables.membership(name, u)) for u in tables.channel_members(name))
                 for name in names},
                {name for name in names if tables.private(name)},
                {name: tables.creator(name) for name in names if tables.creator(name) is not None})

    @invariant()
    def same_content(self) -> None:
        tables = self.tables
        tables.check()
        names, members, private, creators = self.content()
        assert names == sorted(self.members)
        assert members == {name: sorted(m.items()) for name, m in self.members.items()}
        assert private == self.private
        assert creators == self.creators
        assert tables.channel_count() == len(self.members)
        assert tables.membership_count() == sum(map(len, self.members.values()))
        joined: dict[int, list] = {}
        for name, m in self.members.items():
            for user, push in m.items():
                joined.setdefault(user, []).append((name, push))
        created: dict[int, int] = {}
        for creator in self.creators.values():
            created[creator] = created.get(creator, 0) + 1
        # a creator is held while it counts a channel, member or not; then it goes
        assert tables.user_count() == len(joined.keys() | created.keys())
        for user in joined.keys() | created.keys() | {1, 2, 2**64 - 1}:
            assert tables.created(user) == created.get(user, 0)
            assert sorted(tables.user_channels(user)) == sorted(joined.get(user, []))
        for name, m in self.members.items():
            assert tables.member_count(name) == len(m)


TablesMatchAModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_tables_match_a_model = TablesMatchAModel.TestCase


def test_a_channel_exists_without_members_until_dropped():
    tables = Tables()
    assert tables.add_channel("lobby") and not tables.add_channel("lobby")
    assert tables.channel_exists("lobby") and tables.channel_members("lobby") == []
    assert tables.subscribe("lobby", 7, True) is None
    assert not tables.drop_channel("lobby")               # it has a member
    assert tables.unsubscribe("lobby", 7) is True
    assert tables.channel_exists("lobby") and tables.user_count() == 0
    assert tables.drop_channel("lobby") and not tables.channel_exists("lobby")
    assert tables.memory_bytes() == Tables().memory_bytes()   # nothing left behind


def test_bad_input_is_refused_cleanly():
    tables = Tables()
    with pytest.raises(ValueError):
        tables.subscribe("a", 0, True)
    with pytest.raises(OverflowError):
        tables.subscribe("a", 2**64, True)
    with pytest.raises(KeyError):
        tables.set_private("nowhere", True)
    assert tables.membership("nowhere", 1) is None and tables.unsubscribe("nowhere", 1) is None
    assert tables.delete_channel("nowhere") is None and tables.user_channels(1) == []


def test_a_big_channel_and_a_user_in_many_channels():
    """100,000 members in one channel, one user in 1,000: joins and leaves stay cheap,
    and arrays give memory back when mostly emptied."""
    tables = Tables()
    for user in range(1, 100_001):
        tables.subscribe("big", user, user % 2 == 0)
    for index in range(1000):
        tables.subscribe(f"c{index}", 1, True)
    full = tables.memory_bytes()
    for user in range(2, 100_001, 3):       # leaves from the middle move the last member in
        assert tables.unsubscribe("big", user) == (user % 2 == 0)
    for index in range(0, 1000, 2):
        assert tables.unsubscribe(f"c{index}", 1) is True
    tables.check()
    assert tables.member_count("big") == 100_000 - len(range(2, 100_001, 3))
    assert len(tables.user_channels(1)) == 501
    assert sorted(tables.channel_members("big")) == [u for u in range(1, 100_001) if u % 3 != 2]
    for user in range(1, 100_001):
        tables.unsubscribe("big", user)
    assert tables.memory_bytes() < full - 100_000 * 4 - 99_000 * 24   # member words, users' 3-pair arrays
    tables.check()


def test_up_to_two_members_live_in_the_channel_record():
    """No member array until a third member; back in the record when down to two."""
    tables = Tables()
    tables.add_channel("c")
    empty = tables.memory_bytes()
    tables.subscribe("c", 1, True)
    tables.subscribe("c", 2, False)
    two = tables.memory_bytes()
    assert two == empty + 2 * 24                         # each user's 3-pair array, no member array
    tables.subscribe("c", 3, True)
    assert tables.memory_bytes() == two + 24 + 6 * 4     # the third user's pairs, 6 member words
    assert sorted(tables.channel_members("c")) == [1, 2, 3]
    assert tables.unsubscribe("c", 1) is True            # 3 moves into 1's place, then all go inline
    assert tables.memory_bytes() == two
    assert sorted(tables.channel_members("c")) == [2, 3]
    assert tables.membership("c", 2) is False and tables.membership("c", 3) is True
    tables.check()


def test_a_user_in_20_channels_holds_23_pairs():
    """Arrays grow by an eighth, filling malloc's chunks: 184 bytes for 20 pairs of 8."""
    tables = Tables()
    for index in range(20):
        tables.add_channel(f"c{index}")
    before = tables.memory_bytes()
    for index in range(20):
        tables.subscribe(f"c{index}", 1, True)
    assert tables.memory_bytes() - before == 23 * 8     # the channels' one member each is inline
    tables.check()


def test_names_share_an_arena_compacted_when_half_holes():
    """Long and non-ASCII names, most deleted: the survivors keep their names and
    members, the arena gives memory back, and freed names can come back."""
    tables = Tables(1)
    names = [f"{i}-" + "名" * (i % 90) for i in range(300)]       # up to 272 bytes
    for user, name in enumerate(names, 1):
        tables.subscribe(name, user, user % 2 == 0)
    full = tables.memory_bytes()
    for name in names[::3] + names[1::3]:
        tables.delete_channel(name)
    tables.check()
    assert tables.memory_bytes() < full
    survivors = {name: user for user, name in enumerate(names, 1) if user % 3 == 0}
    assert sorted(tables.channel_names()) == sorted(survivors)
    for name, user in survivors.items():
        assert tables.channel_members(name) == [user] and tables.membership(name, user) == (user % 2 == 0)
    for name in names[::3]:
        assert tables.add_channel(name)
    tables.check()
    assert tables.channel_count() == 200 and all(tables.channel_exists(name) for name in names[::3])
