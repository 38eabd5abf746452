"""Potboiler KV: a replicated CRDT key/value store built on the log.

How it fits together (each module's docstring has the details):

- `crdts`: the pure CRDT logic (LWW, OR-Set, G-Set, PN-Counter, MV-Register): `prepare` a client's op
  into an event payload, `apply` a payload, `value` for GET.
- `events`: the change event a write appends to the log, `{"table", "key", "crdt", "op", "change"}`.
- `state`: the materialised tables of one node on its own store (`<data-dir>/kv`): validating writes
  into events with their dependencies, applying delivered log entries in batches (states and cursor in
  one write), reads; `encoding`: a state's stored form (JSON, or an LWW register's binary record).
- `service`: the node service: the applier task on the log subscription, writes (`update`) and reads
  (`current`, `keys_page`) with read-your-writes.
- `servicers`: KvService (typed gRPC), KvRestService (the seed's REST paths on port B+1, bare JSON),
  KvBrowserService (HTML pages on port B+2); `browser` renders the pages.

From the node's shared modules: `potboiler.server.names` checks table and key names
(`[A-Za-z0-9_-]{1,128}`, as Pigtail's queue names), `potboiler.server.jsonvalue` converts between
google.protobuf.Value and plain JSON.

Behaviour worth knowing:

- Tables are created (or re-typed) by setting `{"crdt": "<type>"}` at `_config/<name>`; `_config` is
  an LWW table, so concurrent creations with different types settle on one. States are kept per type,
  so a re-typed table shows the keys written for its new type.
- A write to a table the node does not know is accepted (200, `"pending": true`) when it fits some
  table type, and takes effect on every node once the table exists there.
- A write depends on its table's `_config` entry and, of the entries it supersedes (OR-Set
  remove/add, MV-Register set), on the newest of each owner (whose chain brings the others), so every
  node applies it only after them. A write to a table its node does not know yet carries the tags
  its node had observed for the key, with the same dependencies.
- Limits: a write's entry may hold at most 1 MiB (413 beyond), REST bodies at most 2 MiB (Envoy). JSON
  numbers travel as doubles, so a PN-Counter's increments (and its decrements) total at most 2**53 as
  seen by the node taking the write (400 beyond). A negative amount counts the other way (`increment`
  -3 is appended as `decrement` 3). Numbers in OR-Set and G-Set items are compared as they travel:
  `1.0` and `1` name the same item.
- Entries of the log that are not exactly KV events are ignored; KV events appended through the log API
  directly are applied like any other.
"""
