"""Membership: what it keeps in its store survives a restart (a new Membership on the same store)."""

from __future__ import annotations

import pytest

from potboiler.server.errors import InvalidArgument, NotFound
from potboiler.server.membership import Membership
from potboiler.server.storage import MemoryStore

SELF = "http://127.0.0.1:8000"
PEER = "http://127.0.0.1:8100"
ALIAS = "http://localhost:8100"
PEER_ID = "6a4a4ee0-3d71-4f8a-9a52-1f2ad1e0c0de"


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
        membership.remove(ALIAS)


def test_a_peers_node_id_is_kept_and_its_removal_refuses_the_node_under_any_url() -> None:
    store = MemoryStore()
    membership = Membership(store, SELF)
    membership.learn(PEER)
    membership.identify(PEER, PEER_ID)
    assert restarted(membership, store).url_of(PEER_ID) == PEER
    membership.remove(PEER)
    again = restarted(membership, store)
    assert again.url_of(PEER_ID) is None and again.is_removed_node(PEER_ID)
    again.add(ALIAS)  # an operator adds the node back, under another URL
    again.identify(ALIAS, PEER_ID)
    assert not again.is_removed_node(PEER_ID) and again.is_removed(PEER)
    assert not restarted(again, store).is_removed_node(PEER_ID)


def test_a_dropped_alias_is_not_learned_again_and_its_node_is_not_refused() -> None:
    store = MemoryStore()
    membership = Membership(store, SELF)
    changes: list[tuple[str, bool]] = []
    membership.on_change(lambda url, added: changes.append((url, added)))
    membership.learn(PEER)
    membership.identify(PEER, PEER_ID)
    membership.add(ALIAS)
    membership.drop_alias(ALIAS)
    membership.drop_alias(ALIAS)  # already gone: nothing happens
    assert changes == [(PEER, True), (ALIAS, True), (ALIAS, False)]
    again = restarted(membership, store)
    assert again.urls() == [PEER] and not again.learn(ALIAS) and not again.is_joining(ALIAS)
    assert not again.is_removed_node(PEER_ID)
    # It is no removal: another node serving at that URL later, dialing in, is a peer.
    assert not again.is_removed(ALIAS)
    assert again.learn(ALIAS, dialed_in=True) and restarted(again, store).urls() == sorted([ALIAS, PEER])
