"""The part of etcd's v3 gRPC API the benchmarks use, compiled at run time.

etcd does not ship its `.proto` files (and upstream's import gogoproto and the gateway annotations), so
this module carries a wire-compatible subset of `etcdserverpb` (rpc.proto) and `mvccpb` (kv.proto):
the same package name, message names and field numbers, only the fields the benchmarks read or write.
Unknown fields in etcd's answers are skipped by protobuf, so the subset talks to a real etcd 3.4.
`messages()` compiles it with grpcio-tools into a temporary directory, imports it and removes the
directory (the imported module keeps its descriptors in memory); the result is cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

#: Method paths of the RPCs used (service names as in etcd's rpc.proto).
PUT = "/etcdserverpb.KV/Put"
TXN = "/etcdserverpb.KV/Txn"
WATCH = "/etcdserverpb.Watch/Watch"
STATUS = "/etcdserverpb.Maintenance/Status"

PROTO = """
syntax = "proto3";
package etcdserverpb;

message ResponseHeader {
  uint64 cluster_id = 1;
  uint64 member_id = 2;
  int64 revision = 3;
  uint64 raft_term = 4;
}

message KeyValue {            // mvccpb.KeyValue
  bytes key = 1;
  int64 create_revision = 2;
  int64 mod_revision = 3;
  int64 version = 4;
  bytes value = 5;
  int64 lease = 6;
}

message Event {               // mvccpb.Event
  enum EventType { PUT = 0; DELETE = 1; }
  EventType type = 1;
  KeyValue kv = 2;
  KeyValue prev_kv = 3;
}

message PutRequest {
  bytes key = 1;
  bytes value = 2;
  int64 lease = 3;
  bool prev_kv = 4;
}

message PutResponse {
  ResponseHeader header = 1;
}

message RequestOp {
  oneof request {
    PutRequest request_put = 2;
  }
}

message TxnRequest {
  repeated RequestOp success = 2;
}

message TxnResponse {
  ResponseHeader header = 1;
  bool succeeded = 2;
}

message WatchCreateRequest {
  bytes key = 1;
  bytes range_end = 2;
  int64 start_revision = 3;
}

message WatchRequest {
  oneof request_union {
    WatchCreateRequest create_request = 1;
  }
}

message WatchResponse {
  ResponseHeader header = 1;
  int64 watch_id = 2;
  bool created = 3;
  bool canceled = 4;
  int64 compact_revision = 5;
  string cancel_reason = 6;
  repeated Event events = 11;
}

message StatusRequest {}

message StatusResponse {
  ResponseHeader header = 1;
  string version = 2;
  int64 dbSize = 3;
  uint64 leader = 4;
  uint64 raftIndex = 5;
  uint64 raftTerm = 6;
  uint64 raftAppliedIndex = 7;
}
"""


@functools.cache
def messages() -> ModuleType:
    """The compiled message classes (`PutRequest`, `TxnRequest`, `WatchRequest`, …)."""
    with tempfile.TemporaryDirectory(prefix="potboiler-bench-etcd-proto-") as folder:
        source = Path(folder) / "etcd_bench_rpc.proto"
        source.write_text(PROTO)
        status = protoc.main(["protoc", f"-I{folder}", f"--python_out={folder}", str(source)])
        if status != 0:
            raise RuntimeError(f"protoc failed ({status}) on the etcd API subset")
        spec = importlib.util.spec_from_file_location(
            "etcd_bench_rpc_pb2", Path(folder) / "etcd_bench_rpc_pb2.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
