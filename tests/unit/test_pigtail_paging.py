"""Pages of a Pigtail listing: paging through gives the whole listing once, in order; a page starts
after the last item given even when the listing changed; a token that is not one is refused."""

from __future__ import annotations

import base64

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from potboiler.pigtail.machine import Stamp
from potboiler.pigtail.paging import MAX_PAGE_SIZE, page
from potboiler.pigtail.validate import MAX_TEXT
from potboiler.server.errors import InvalidArgument
from potboiler.v1 import pigtail_pb2 as pb

ranks = st.tuples(
    st.integers(-5, 5),
    st.integers(0, 2**53),
    st.builds(Stamp, st.integers(0, 2**53), st.integers(0, 100), st.uuids().map(str)),
    st.uuids().map(str),
)


def listing(keys: list[tuple[int, int, Stamp, str]]) -> list[tuple[tuple[int, int, Stamp, str], str]]:
    return [(key, key[3]) for key in sorted(set(keys))]


@given(keys=st.lists(ranks, max_size=40), size=st.integers(0, 12))
def test_paging_through_gives_everything_once_in_order(
    keys: list[tuple[int, int, Stamp, str]], size: int
) -> None:
    whole = listing(keys)
    got: list[str] = []
    token = ""
    while True:
        items, token = page(whole, size, token)
        assert len(items) <= (size or MAX_PAGE_SIZE)
        got += items
        if not token:
            break
    assert got == [item for _, item in whole]


@given(keys=st.lists(ranks, min_size=3, max_size=30), gone=st.sets(st.integers(0, 29)))
def test_a_page_starts_after_the_last_item_given(
    keys: list[tuple[int, int, Stamp, str]], gone: set[int]
) -> None:
    whole = listing(keys)
    assume(len(whole) >= 3)
    _, token = page(whole, 2, "")
    later = [pair for i, pair in enumerate(whole) if i not in gone]  # items went meanwhile
    rest, _ = page(later, 0, token)
    assert rest == [item for key, item in later if key > whole[1][0]]


@pytest.mark.parametrize(
    "token",
    ["not a token", "e30=", "IngiCg==", "!!!!", base64.urlsafe_b64encode(b"[" * 600 + b"]" * 600).decode()],
)
def test_a_token_that_is_not_one_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        page(listing([(0, 1, Stamp(1, 0, "n"), "t")]), 1, token)


def test_ids_as_keys() -> None:
    whole = [(k, k) for k in ("a", "b", "c")]
    assert page(whole, 2, "") == (["a", "b"], page(whole, 2, "")[1])
    assert page(whole, 2, page(whole, 2, "")[1]) == (["c"], "")


def test_a_full_page_of_the_largest_summaries_fits_a_default_grpc_client() -> None:
    widest = pb.TaskSummary(
        task_id="\U0001f600" * 128, task_name="\U0001f600" * MAX_TEXT, state=pb.TASK_STATE_PENDING
    )
    assert (
        pb.ListTasksResponse(tasks=[widest] * MAX_PAGE_SIZE, next_page_token="x" * 200).ByteSize() < 4 << 20
    )
