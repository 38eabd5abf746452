"""How the log lies in its `Store`: the keys, and the records that are more than one value.

Ids and owners are written as their 16 UUID bytes, numbers as big-endian u64; a "location" is
owner + seq, 24 bytes:

    o<owner><seq>      -> Entry        each owner's chain: the serialized potboiler.v1.Entry, `next`
                                       left empty (nothing written is ever rewritten; `next` is the
                                       lookup of seq + 1), so reading a chain is one sequential scan
    e<id>              -> location     the index by id
    h<owner>           -> seq, id      the owner's head: this node's version vector component
    x<position>        -> run          this node's delivery order (what subscriptions resume from),
                                       in runs (`DeliveryRun`): a location, then (when more than 1) a
                                       big-endian u32 count: `position`, position + 1, ... deliver
                                       seq, seq + 1, ... of that owner's chain. A batch delivering
                                       1,000 entries of one owner in a row writes one record instead
                                       of 1,000.
    u<id>              -> ''           stored but not yet delivered
    p<missing><waiter> -> ''           `waiter` waits for `missing` to be delivered
    f<owner id text>   -> seq, id text a forked owner's log (see `potboiler.server.log_forks`)
    m<name>            -> value        node metadata: its id (`mnode_id`), the layout's format
                                       (`mformat`, see `potboiler.server.log.LOG_FORMAT`)

The same store holds the membership (`n`, `r`, `j`, `a`, `v`: see `potboiler.server.membership`)
and the webhooks (`w`: see `potboiler.server.webhooks`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from potboiler.server.storage import Write, prefix_end

U64 = struct.Struct(">Q")
#: A head record: the seq and the 16-byte id of an owner's newest entry.
HEAD = struct.Struct(">Q16s")
#: The count of a delivery run longer than one.
_COUNT = struct.Struct(">I")
LOCATION_BYTES = 24
#: The range of keys of the delivery order.
DELIVERY_START, DELIVERY_END = b"x", prefix_end(b"x")


@dataclass
class DeliveryRun:
    """Delivery positions `position`, `position` + 1, ... of `count` entries: seq, seq + 1, ... of
    `owner`'s chain."""

    position: int
    owner: bytes
    seq: int
    count: int = 1

    def record(self) -> Write:
        """Its record in the store (a bare location for a run of one)."""
        value = self.owner + U64.pack(self.seq)
        if self.count != 1:
            value += _COUNT.pack(self.count)
        return b"x" + U64.pack(self.position), value

    @classmethod
    def read(cls, key: bytes, value: bytes) -> DeliveryRun:
        """The run a store record holds (see `record`)."""
        count = _COUNT.unpack_from(value, LOCATION_BYTES)[0] if len(value) > LOCATION_BYTES else 1
        return cls(U64.unpack(key[1:])[0], value[:16], U64.unpack(value[16:LOCATION_BYTES])[0], count)

    @property
    def last(self) -> int:
        """Its last position."""
        return self.position + self.count - 1
