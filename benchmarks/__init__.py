"""Benchmarks: scripts that print their figures as JSON (see the README).

Their asyncio clients run on uvloop (`uvloop.run`), as the nodes do: on a 2-core machine the load
generator shares the CPU with the systems it measures, and a cheaper client leaves more of it to them
(to every system alike: etcd's, NATS's and Redis's Python clients run on the same loop).
"""
