"""
Which connections a site keeps when its tunnel server is several replicas:
the decisions, without Twisted (the site role, L{rtunnel.roles.site},
carries them out).

A server that negotiated the REPLICAS capability tells the site, on every
session, its own replica id and the set of live replicas (docs/protocol.md).
The site wants one session with each. It dials through I{slots}: each slot
keeps at most one connection up (a L{ReconnectingService
<rtunnel.roles.reconnect.ReconnectingService>}), to a I{target}: the
keyfile's addresses (L{KEYFILE}, usually one load-balanced address, so the
replica reached is the balancer's choice) or the address a replica
advertises for itself (reached directly, for that replica).

 - A slot whose session announced replica id X I{holds} X, unless another
   slot holds X with a session still live: the new session is then a
   duplicate (the balancer sent us to a replica we have), to be closed.
 - Slots not holding anything dial; there are as many as the announced
   replicas not held, each to its replica's advertised address if it has
   one, else to the keyfile's; and one to the keyfile's addresses while
   nothing is held (the announced set may be stale: every replica in it may
   be gone, and only the keyfile's addresses lead to the new ones).
 - A held replica dropped from the announced set keeps its session; once
   that session ends, its slot is not wanted any more.
 - A server without the capability: its session is held under
   L{NO_REPLICAS}, and nothing more is dialled (one session, as before
   replicas existed).

A slot's session that says nothing yet (open, its REPLICAS not arrived) is
dialling capacity still: it counts towards its target's slots, and is the
last of them to be stopped.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping

from attrs import frozen

__all__ = [
    "DUPLICATE_RETRY_CAP",
    "DUPLICATE_RETRY_INITIAL",
    "KEYFILE",
    "NO_REPLICAS",
    "Claim",
    "Plan",
    "ReplicaSet",
    "SlotView",
    "duplicate_delay",
]

#: The target of a slot that dials the keyfile's addresses (in turn).
KEYFILE = ""
#: The replica id a session with a server without the REPLICAS capability is held under.
NO_REPLICAS = ""
#: First delay before a slot whose session was a duplicate dials again (seconds).
DUPLICATE_RETRY_INITIAL = 0.25
#: The longest such delay.
DUPLICATE_RETRY_CAP = 15.0


def duplicate_delay(duplicates: int, jitter: float) -> float:
    """
    The delay before a slot dials again after its C{duplicates}-th
    duplicate session in a row (1 for the first): from
    L{DUPLICATE_RETRY_INITIAL}, doubling, spread over the doubling itself
    as the site's other retries are (C{jitter} in [0, 1]): 0.25-0.5 s,
    0.5-1 s, ..., at most L{DUPLICATE_RETRY_CAP}.

    Short at first: behind a balancer that picks at random, the replica
    the site still lacks is usually reached within a few tries. Growing:
    a replica announced but unreachable through the balancer (its
    heartbeat not expired yet, or the balancer not sending anything its
    way) must not cost its replicas a handshake every quarter second.
    """
    if duplicates < 1:
        raise ValueError(f"duplicates counts from 1, not {duplicates!r}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], not {jitter!r}")
    base = min(DUPLICATE_RETRY_INITIAL * 2.0 ** min(duplicates - 1, 64), DUPLICATE_RETRY_CAP / 2)
    return base * (1.0 + jitter)


@frozen
class SlotView:
    """
    A dialling slot as the plan sees it.

    @ivar target: L{KEYFILE}, or the HOST:PORT a replica advertised.
    @ivar pending: its session is open and has not said which replica it is yet.
    """

    target: str
    pending: bool = False


@frozen
class Plan:
    """
    What to change so that the slots match the replicas.

    @ivar start: the targets of slots to add, one slot each.
    @ivar stop: the keys of slots to stop (none of them holds a replica).
    """

    start: tuple[str, ...] = ()
    stop: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.start or self.stop)


class Claim(enum.Enum):
    """What a session's announcement of its replica means."""

    #: the slot holds the replica now (or held it already)
    HELD = "held"
    #: another slot holds it with a live session: close this one
    DUPLICATE = "duplicate"


class ReplicaSet:
    """
    The announced replicas and which slot holds which, by slot key (any
    hashable the caller numbers its slots with).

    @ivar announced: replica id -> advertised address (C{""}: none), as
        the last announcement said; C{None} before any.
    """

    def __init__(self) -> None:
        self.announced: dict[str, str] | None = None
        self._holder: dict[str, int] = {}
        self._held_by: dict[int, str] = {}

    @property
    def holders(self) -> Mapping[str, int]:
        """Replica id -> the slot holding it (read-only view)."""
        return self._holder.copy()

    def held_by(self, slot: int) -> str | None:
        """The replica C{slot} holds, if any."""
        return self._held_by.get(slot)

    def announce(self, slot: int, own: str, replicas: Mapping[str, str], holder_live: Callable[[int], bool]) -> Claim:
        """
        C{slot}'s session announced that it is replica C{own}, one of
        C{replicas} (id -> advertised address); the newest announcement
        from any session is the set from now on.

        @param holder_live: whether the session of the slot that holds
            C{own} now is still live (open, not ending); a holder whose
            session is ending (the replica drains it, or replaced it) gives
            way to the new session.
        """
        if own not in replicas:
            raise ValueError(f"replica {own!r} announced a set without itself")
        self.announced = dict(replicas)
        return self._claim(slot, own, holder_live)

    def unannounced(self, slot: int, holder_live: Callable[[int], bool]) -> Claim:
        """C{slot}'s session is with a server without the REPLICAS capability."""
        return self._claim(slot, NO_REPLICAS, holder_live)

    def _claim(self, slot: int, replica: str, holder_live: Callable[[int], bool]) -> Claim:
        if self._held_by.get(slot) == replica:
            return Claim.HELD
        holder = self._holder.get(replica)
        if holder is not None and holder != slot and holder_live(holder):
            return Claim.DUPLICATE
        self.released(slot)
        if holder is not None:
            del self._held_by[holder]
        self._holder[replica] = slot
        self._held_by[slot] = replica
        return Claim.HELD

    def released(self, slot: int) -> str | None:
        """C{slot}'s session ended (or the slot is gone): what it held, if anything, is not held any more."""
        replica = self._held_by.pop(slot, None)
        if replica is not None:
            del self._holder[replica]
        return replica

    def wanted(self) -> list[str]:
        """The targets of the dialling slots wanted now, in replica id order (see the module)."""
        held = self._holder.keys()
        if NO_REPLICAS in held:
            return []
        if self.announced is None:
            return [] if held else [KEYFILE]
        targets = [address or KEYFILE for replica, address in sorted(self.announced.items()) if replica not in held]
        if not held and KEYFILE not in targets:
            targets.append(KEYFILE)
        return targets

    def missing(self) -> list[str]:
        """The announced replicas not held, by id."""
        if self.announced is None:
            return []
        return sorted(replica for replica in self.announced if replica not in self._holder)

    def plan(self, slots: Mapping[int, SlotView]) -> Plan:
        """
        Which slots to add and which to stop, given every slot there is:
        those not holding a replica are matched to the L{wanted} targets
        (those with a pending session first, then the oldest, by key); the
        rest stop; wanted targets left over get new slots.
        """
        wanted = self.wanted()
        remaining = Counter(wanted)
        idle = sorted((key for key in slots if key not in self._held_by), key=lambda key: (not slots[key].pending, key))
        stop = []
        for key in idle:
            target = slots[key].target
            if remaining[target] > 0:
                remaining[target] -= 1
            else:
                stop.append(key)
        start = []
        for target in wanted:
            if remaining[target] > 0:
                remaining[target] -= 1
                start.append(target)
        return Plan(tuple(start), tuple(sorted(stop)))
