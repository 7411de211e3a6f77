"""
The site's decisions about server replicas (L{rtunnel.roles.replica_set}):
which slots dial where, which session is a duplicate, the duplicate's
backoff; examples, then random sequences of events checked against the
rules (hypothesis).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.roles.replica_set import (
    KEYFILE,
    NO_REPLICAS,
    Claim,
    Plan,
    ReplicaSet,
    SlotView,
    duplicate_delay,
)


def live(_: int) -> bool:
    return True


def dead(_: int) -> bool:
    return False


AB = {"a": "", "b": ""}


class DuplicateDelayTests(SynchronousTestCase):
    def test_doubles_from_a_quarter_second_to_fifteen(self) -> None:
        """Each duplicate in a row doubles the delay, spread over the doubling; never beyond 15 s."""
        self.assertEqual([duplicate_delay(n, 0.0) for n in range(1, 9)], [0.25, 0.5, 1, 2, 4, 7.5, 7.5, 7.5])
        self.assertEqual(duplicate_delay(1, 0.999), 0.25 * 1.999)
        self.assertEqual(duplicate_delay(10_000, 1.0), 15.0)

    def test_bad_inputs(self) -> None:
        with self.assertRaises(ValueError) as e:
            duplicate_delay(0, 0.5)
        self.assertIn("counts from 1", str(e.exception))
        with self.assertRaises(ValueError) as e:
            duplicate_delay(1, 1.5)
        self.assertIn("jitter must be in [0, 1], not 1.5", str(e.exception))


class ReplicaSetTests(SynchronousTestCase):
    def test_before_any_announcement_one_slot_dials_the_keyfile(self) -> None:
        replicas = ReplicaSet()
        self.assertEqual(replicas.wanted(), [KEYFILE])
        self.assertEqual(replicas.plan({}), Plan(start=(KEYFILE,)))
        self.assertEqual(replicas.plan({0: SlotView(KEYFILE)}), Plan())

    def test_one_slot_per_replica_not_held(self) -> None:
        """The first session says there are three: two more slots dial the keyfile's address."""
        replicas = ReplicaSet()
        self.assertIs(replicas.announce(0, "b", {"a": "", "b": "", "c": ""}, live), Claim.HELD)
        self.assertEqual(replicas.missing(), ["a", "c"])
        slots = {0: SlotView(KEYFILE)}
        self.assertEqual(replicas.plan(slots), Plan(start=(KEYFILE, KEYFILE)))
        slots.update({1: SlotView(KEYFILE), 2: SlotView(KEYFILE)})
        self.assertEqual(replicas.plan(slots), Plan())
        self.assertIs(replicas.announce(2, "c", {"a": "", "b": "", "c": ""}, live), Claim.HELD)
        self.assertEqual(replicas.plan(slots), Plan())
        self.assertEqual(replicas.holders, {"b": 0, "c": 2})
        # a is gone from the set before slot 1 reached it: slot 1 is not wanted.
        replicas.announce(0, "b", {"b": "", "c": ""}, live)
        self.assertEqual(replicas.plan(slots), Plan(stop=(1,)))

    def test_advertised_replicas_are_dialled_directly(self) -> None:
        replicas = ReplicaSet()
        replicas.announce(0, "a", {"a": "10.0.0.1:4443", "b": "10.0.0.2:4443", "c": ""}, live)
        self.assertEqual(replicas.wanted(), ["10.0.0.2:4443", KEYFILE])
        # The slot that reached a through the keyfile keeps it; b gets a direct slot.
        self.assertEqual(replicas.plan({0: SlotView(KEYFILE)}), Plan(start=("10.0.0.2:4443", KEYFILE)))
        # A slot for b that reached c instead (a balancer behind b's address): b still wanted.
        slots = {0: SlotView(KEYFILE), 1: SlotView("10.0.0.2:4443"), 2: SlotView(KEYFILE)}
        replicas.announce(1, "c", {"a": "10.0.0.1:4443", "b": "10.0.0.2:4443", "c": ""}, live)
        self.assertEqual(replicas.plan(slots), Plan(start=("10.0.0.2:4443",), stop=(2,)))

    def test_duplicate_of_a_live_session(self) -> None:
        """A second session with a replica held live is a duplicate; the holder keeps it."""
        replicas = ReplicaSet()
        replicas.announce(0, "a", AB, live)
        self.assertIs(replicas.announce(1, "a", AB, live), Claim.DUPLICATE)
        self.assertEqual(replicas.holders, {"a": 0})
        self.assertIsNone(replicas.held_by(1))
        # The holder announcing again (a new set) is no duplicate of itself.
        self.assertIs(replicas.announce(0, "a", {"a": "", "b": "", "c": ""}, live), Claim.HELD)
        self.assertEqual(replicas.missing(), ["b", "c"])

    def test_a_holder_whose_session_ends_gives_way(self) -> None:
        """The holder's session is ending (the replica drains it, or took the new one over): the new one holds."""
        replicas = ReplicaSet()
        replicas.announce(0, "a", AB, live)
        self.assertIs(replicas.announce(1, "a", AB, dead), Claim.HELD)
        self.assertEqual(replicas.holders, {"a": 1})
        self.assertIsNone(replicas.held_by(0))
        # The old session's end later releases nothing of the new one's.
        self.assertIsNone(replicas.released(0))
        self.assertEqual(replicas.holders, {"a": 1})

    def test_a_replica_dropped_from_the_set(self) -> None:
        """Its session stays held; once it ends, its slot is not wanted any more."""
        replicas = ReplicaSet()
        replicas.announce(0, "a", AB, live)
        replicas.announce(1, "b", AB, live)
        slots = {0: SlotView(KEYFILE), 1: SlotView(KEYFILE)}
        replicas.announce(0, "a", {"a": ""}, live)
        self.assertEqual(replicas.plan(slots), Plan())
        self.assertEqual(replicas.released(1), "b")
        self.assertEqual(replicas.plan(slots), Plan(stop=(1,)))

    def test_every_session_gone_redials_the_last_set(self) -> None:
        """With nothing held the last set is still what the site wants (it may be stale: the keyfile's too)."""
        replicas = ReplicaSet()
        replicas.announce(0, "a", {"a": "10.0.0.1:4443", "b": "10.0.0.2:4443"}, live)
        replicas.released(0)
        self.assertEqual(replicas.wanted(), ["10.0.0.1:4443", "10.0.0.2:4443", KEYFILE])

    def test_a_server_without_the_capability(self) -> None:
        """One session, as before replicas: nothing else dials."""
        replicas = ReplicaSet()
        slots = {0: SlotView(KEYFILE)}
        self.assertIs(replicas.unannounced(0, live), Claim.HELD)
        self.assertEqual(replicas.holders, {NO_REPLICAS: 0})
        self.assertEqual(replicas.wanted(), [])
        self.assertEqual(replicas.plan(slots), Plan())
        replicas.released(0)
        self.assertEqual(replicas.plan(slots), Plan())
        self.assertEqual(replicas.wanted(), [KEYFILE])

    def test_pending_sessions_are_kept_before_idle_slots(self) -> None:
        replicas = ReplicaSet()
        replicas.announce(0, "a", AB, live)
        slots = {0: SlotView(KEYFILE), 1: SlotView(KEYFILE), 2: SlotView(KEYFILE, pending=True)}
        self.assertEqual(replicas.plan(slots), Plan(stop=(1,)))

    def test_an_announcement_without_its_sender(self) -> None:
        with self.assertRaises(ValueError) as e:
            ReplicaSet().announce(0, "x", AB, live)
        self.assertIn("replica 'x' announced a set without itself", str(e.exception))


# -- random sequences ------------------------------------------------------------

IDS = ["a", "b", "c", "d"]
ADDRESSES = ["", "", "10.0.0.1:4443"]

sets = st.dictionaries(st.sampled_from(IDS), st.sampled_from(ADDRESSES), min_size=1, max_size=4)
events = st.one_of(
    st.tuples(st.just("announce"), st.integers(0, 7), st.data()),
    st.tuples(st.just("legacy"), st.integers(0, 7), st.none()),
    st.tuples(st.just("end"), st.integers(0, 7), st.none()),
    st.tuples(st.just("ending"), st.integers(0, 7), st.none()),
)


class Model:
    """The site as the plan drives it: slots with a target, some with a session (live or ending)."""

    def __init__(self) -> None:
        self.replicas = ReplicaSet()
        self.slots: dict[int, SlotView] = {}
        self.sessions: dict[int, bool] = {}  # slot -> its session is live (not ending)
        self.next_key = 0

    def apply(self, plan: Plan) -> None:
        for key in plan.stop:
            assert self.replicas.held_by(key) is None, "a slot holding a replica was stopped"
            del self.slots[key]
            self.sessions.pop(key, None)
        for target in plan.start:
            self.slots[self.next_key] = SlotView(target)
            self.next_key += 1

    def check(self) -> None:
        holders = self.replicas.holders
        assert len(set(holders.values())) == len(holders), "a slot holds two replicas"
        for replica, slot in holders.items():
            assert slot in self.slots and slot in self.sessions, f"{replica} held by a slot without a session"
            assert self.replicas.held_by(slot) == replica
        idle = Counter(view.target for key, view in self.slots.items() if key not in holders.values())
        assert idle == Counter(self.replicas.wanted()), (idle, self.replicas.wanted())
        if NO_REPLICAS in holders:
            assert not idle, "something dials beside a server without the capability"
        elif not holders:
            assert idle[KEYFILE] >= 1, "nothing held and nothing dials the keyfile's addresses"


class RandomSequenceTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(events, max_size=40))
    def test_slots_always_match_the_replicas_wanted(
        self, sequence: list[tuple[str, int, st.DataObject | None]]
    ) -> None:
        """
        Whatever the sessions say and however they end, after each plan is
        carried out: each replica is held by one slot at most, a slot holds
        one replica at most, the idle slots are exactly the targets wanted,
        a duplicate is declared only while its holder is live, and the
        plan then has nothing more to change.
        """
        model = Model()
        model.apply(model.replicas.plan(model.slots))
        model.check()
        for kind, index, data in sequence:
            keys = sorted(model.slots)
            slot = keys[index % len(keys)] if keys else None
            if slot is None:
                continue
            if kind == "announce":
                assert data is not None
                replicas = data.draw(sets)
                own = data.draw(st.sampled_from(sorted(replicas)))
                model.sessions.setdefault(slot, True)
                before = model.replicas.holders.get(own)
                claim = model.replicas.announce(slot, own, replicas, lambda k: model.sessions.get(k, False))
                if claim is Claim.DUPLICATE:
                    assert before is not None and before != slot and model.sessions[before]
                    # The site closes it: the session ends, nothing held by it.
                    model.sessions.pop(slot)
                    model.replicas.released(slot)
                else:
                    assert model.replicas.holders[own] == slot
            elif kind == "legacy":
                model.sessions.setdefault(slot, True)
                if model.replicas.unannounced(slot, lambda k: model.sessions.get(k, False)) is Claim.DUPLICATE:
                    model.sessions.pop(slot)
                    model.replicas.released(slot)
            elif kind == "ending":
                if slot in model.sessions:
                    model.sessions[slot] = False
            else:
                model.sessions.pop(slot, None)
                model.replicas.released(slot)
            model.apply(model.replicas.plan(model.slots))
            model.check()
            self.assertEqual(model.replicas.plan(model.slots), Plan())
