"""Membership: what it keeps in its store survives a restart (a new Membership on the same store)."""

from __future__ import annotations

import pytest

from potboiler.server.errors import InvalidArgument, NotFound
from potboiler.server.membership import Membership
from potboiler.server.storage import MemoryStore

SELF = "http://127.0.0.1:8000"
PEER = "http://127.0.0.1:8100"
OTHER = "http://127.0.0.1:8200"


def restarted(membership: Membership, store: MemoryStore) -> Membership:
    return Membership(store, membership.self_url)


def test_an_operators_add_is_joining_until_replication_starts_even_across_a_restart() -> None:
    store = MemoryStore()
    membership = Membership(store, SELF)
    assert membership.add(PEER)
    assert restarted(membership, store).is_joining(PEER)
    membership.joined(PEER)
    assert not membership.is_joining(PEER)
    assert not restarted(membership, store).is_joining(PEER)


def test_removing_a_joining_peer_ends_its_joining_for_good() -> None:
    store = MemoryStore()
    membership = Membership(store, SELF)
    membership.add(PEER)
    membership.remove(PEER)
    again = restarted(membership, store)
    assert not again.is_joining(PEER) and again.is_removed(PEER) and again.urls() == []


def test_a_learned_peer_is_not_joining_and_a_removed_one_is_not_learned() -> None:
    membership = Membership(MemoryStore(), SELF)
    assert membership.learn(PEER) and not membership.is_joining(PEER)
    membership.remove(PEER)
    assert not membership.learn(PEER) and not membership.learn(SELF)
    assert membership.add(PEER, join=False) and not membership.is_joining(PEER)
    with pytest.raises(InvalidArgument):
        membership.add(SELF)
    with pytest.raises(NotFound):
        membership.remove(OTHER)
