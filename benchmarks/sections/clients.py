"""The client side of every system: one write operation each, as an async context manager that
connects, yields the operation (an awaitable call that returns how many entries it wrote, once the
server acknowledged them) and disconnects.

- etcd: grpc.aio KV.Put (unique key per write) / KV.Txn of puts;
- JetStream: nats-py `publish` (waits for the stream's ack) / `publish_async` batches;
- Redis Streams: redis-py asyncio `XADD`;
- Potboiler: grpc.aio AppendEntry / AppendEntries on a node's own gRPC port, and
  potboiler.client's StreamAppender (appends in flight share AppendEntryStream messages).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from benchmarks.append import BODY, GRPC_OPTIONS, batch_request, entry_request
from benchmarks.common import Operation
from benchmarks.peers.etcd import EtcdClient
from potboiler.client.appender import StreamAppender
from potboiler.v1 import log_pb2_grpc

#: The event every write carries (Potboiler's entry data; the others' value or payload, as JSON).
PAYLOAD = json.dumps(BODY).encode()


@asynccontextmanager
async def etcd_put(target: str, prefix: str = "bench/acked/") -> AsyncIterator[Operation]:
    """etcd KV.Put of PAYLOAD under a new key each time."""
    client = EtcdClient(target)
    counter = itertools.count()

    async def put() -> int:
        await client.put(f"{prefix}{next(counter)}".encode(), PAYLOAD)
        return 1

    try:
        yield put
    finally:
        await client.close()


@asynccontextmanager
async def jetstream_publish(url: str, subject: str = "bench.acked") -> AsyncIterator[Operation]:
    """JetStream publish of PAYLOAD, awaiting the stream's acknowledgement."""
    import nats

    nc = await nats.connect(url, connect_timeout=5)
    js = nc.jetstream(timeout=10)

    async def publish() -> int:
        await js.publish(subject, PAYLOAD)
        return 1

    try:
        yield publish
    finally:
        await nc.close()


@asynccontextmanager
async def jetstream_batch(url: str, size: int, subject: str = "bench.batch") -> AsyncIterator[Operation]:
    """`size` JetStream publish_async of PAYLOAD, then wait for all their acknowledgements."""
    import nats

    nc = await nats.connect(url, connect_timeout=5)
    js = nc.jetstream(timeout=30, publish_async_max_pending=100_000)

    async def publish_batch() -> int:
        futures = [await js.publish_async(subject, PAYLOAD) for _ in range(size)]
        await asyncio.gather(*futures)
        return size

    try:
        yield publish_batch
    finally:
        await nc.close()


@asynccontextmanager
async def redis_xadd(url: str, connections: int, stream: str = "bench") -> AsyncIterator[Operation]:
    """Redis XADD of PAYLOAD (a field `data`) on a pool of `connections` connections."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, max_connections=connections)

    async def xadd() -> int:
        await client.xadd(stream, {"data": PAYLOAD})
        return 1

    try:
        yield xadd
    finally:
        await client.aclose()


@asynccontextmanager
async def potboiler_append(target: str) -> AsyncIterator[Operation]:
    """Potboiler AppendEntry of BODY on a node's gRPC port."""
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        request = entry_request()

        async def append() -> int:
            await stub.AppendEntry(request, timeout=10.0)
            return 1

        yield append


@asynccontextmanager
async def potboiler_stream_append(target: str) -> AsyncIterator[Operation]:
    """Potboiler StreamAppender.append of BODY on a node's gRPC port (each awaits its own ack)."""
    async with (
        grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel,
        StreamAppender(channel) as appender,
    ):
        data = entry_request().data

        async def append() -> int:
            await appender.append(data)
            return 1

        yield append


@asynccontextmanager
async def potboiler_batch(target: str, size: int) -> AsyncIterator[Operation]:
    """Potboiler AppendEntries of `size` entries of BODY."""
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        request = batch_request(size)

        async def append() -> int:
            response = await stub.AppendEntries(request, timeout=30.0)
            return len(response.entries)

        yield append
