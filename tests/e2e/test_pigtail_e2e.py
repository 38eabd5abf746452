"""Pigtail end to end on one real node through Envoy (port B+3): the original provider/worker flow and
the gRPC lease worker (the example scripts), claim conflicts (409), expiry back to pending, done tasks
leaving the list, deleting a queue, bad input (400, nothing appended), and the extras (heartbeat, dead
letters and retry, delay, priority, idempotency keys, claim-next)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import grpc
import httpx
import pytest

from potboiler.server.processes import NodeProcess
from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pigtail"


class Pigtail:
    """A REST client on a node's Pigtail port."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.url = node.port_url(node.ports.pigtail)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def create(self, timeout_ms: int = 1000, **extra: Any) -> str:
        name = f"q-{uuid.uuid4().hex[:12]}"
        response = self.http.post("/create", json={"name": name, "timeout_ms": timeout_ms, **extra})
        assert response.status_code == 201, response.text
        assert response.headers["location"] == f"/queue/{name}"
        return name

    def add(self, queue: str, task_name: str = "hello_world", info: Any = None, **extra: Any) -> str:
        response = self.http.post(f"/queue/{queue}", json={"task_name": task_name, "info": info, **extra})
        assert response.status_code == 201, response.text
        task_id: str = response.json()["id"]
        assert response.headers["location"] == f"/queue/{queue}/{task_id}"
        return task_id

    def listing(self, queue: str) -> dict[str, dict[str, str]]:
        response = self.http.get(f"/queue/{queue}")
        assert response.status_code == 200, response.text
        result: dict[str, dict[str, str]] = response.json()
        return result

    def task(self, queue: str, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/queue/{queue}/{task_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def claim(self, queue: str, task_id: str, worker: str) -> httpx.Response:
        return self.http.put(f"/queue/{queue}/{task_id}", json={"worker_id": worker})

    def done(self, queue: str, task_id: str, worker: str) -> httpx.Response:
        return self.http.request("DELETE", f"/queue/{queue}/{task_id}", json={"worker_id": worker})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One real node (with its Envoy) shared by the module's tests; each test uses its own queues."""
    with NodeProcesses(tmp_path_factory.mktemp("pigtail")) as nodes:
        yield nodes("node")


@pytest.fixture
def pig(node: NodeProcess) -> Iterator[Pigtail]:
    client = Pigtail(node)
    try:
        yield client
    finally:
        client.http.close()


def run_example(script: str, *args: str, timeout: float = 120.0) -> list[str]:
    """Run an example script to its end; its stdout lines."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def test_example_provider_and_worker(pig: Pigtail) -> None:
    queue = f"example-{uuid.uuid4().hex[:8]}"
    added = run_example(
        "provider.py", "--url", pig.url, "--queue", queue, "--interval", "0.05", "--count", "5"
    )
    assert len(added) == 5
    assert pig.http.get(f"/queue/{queue}").json() == {
        task_id: {"task_name": "hello_world", "state": "pending"} for task_id in added
    }
    assert pig.task(queue, added[0]) == {
        "task_name": "hello_world",
        "state": "pending",
        "info": {"foo": "bar"},
        "worker": None,
    }
    lines = run_example(
        "worker.py",
        "--url",
        pig.url,
        "--queue",
        queue,
        "--worker-id",
        "w1",
        "--exit-when-empty",
        "--poll-interval",
        "0.05",
    )
    assert sorted(lines) == sorted(f"done {task_id}" for task_id in added)
    assert pig.listing(queue) == {}
    for task_id in added:
        assert pig.task(queue, task_id) == {
            "task_name": "hello_world",
            "state": "done",
            "info": {"foo": "bar"},
            "worker": "w1",
        }
    # The provider against an existing queue with the same settings just adds more tasks.
    assert len(run_example("provider.py", "--url", pig.url, "--queue", queue, "--count", "1")) == 1


def test_example_lease_worker(pig: Pigtail, node: NodeProcess) -> None:
    queue = pig.create()
    ids = [pig.add(queue, info={"n": n}) for n in range(4)]
    lines = run_example(
        "lease_worker.py", "--target", f"127.0.0.1:{node.ports.core}", "--queue", queue, "--max-tasks", "4"
    )
    assert lines == [f"done {task_id}" for task_id in ids]  # oldest first
    assert pig.listing(queue) == {}
    # With --idle-exit it stops by itself once nothing comes (here: at once, the queue is empty).
    idle = ["--idle-exit", "0.5", "--target", f"127.0.0.1:{node.ports.core}", "--queue", queue]
    assert run_example("lease_worker.py", *idle) == []
    # Stopping after some tasks, it completes those and holds none of the others.
    more = [pig.add(queue, info={"n": n}) for n in range(4)]
    target = ["--target", f"127.0.0.1:{node.ports.core}", "--queue", queue]
    assert run_example("lease_worker.py", *target, "--max-tasks", "2") == [f"done {t}" for t in more[:2]]
    assert pig.listing(queue) == {t: {"task_name": "hello_world", "state": "pending"} for t in more[2:]}
    # With tasks handed out ahead (--in-flight 3), it completes those it holds and leaves none claimed.
    more = [pig.add(queue, info={"n": n}) for n in range(6)]
    done = run_example("lease_worker.py", *target, "--max-tasks", "1", "--in-flight", "3")
    assert 1 <= len(done) <= 3
    assert all(task["state"] == "pending" for task in pig.listing(queue).values())


def test_example_lease_worker_waits_for_its_queue(pig: Pigtail, node: NodeProcess) -> None:
    """Started before the provider has created the queue, as worker.py it waits for it."""
    queue = f"later-{uuid.uuid4().hex[:8]}"
    target = ["--target", f"127.0.0.1:{node.ports.core}", "--queue", queue]
    worker = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "lease_worker.py"), *target, "--max-tasks", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        assert "no queue" in worker.stderr.readline()
        assert pig.http.post("/create", json={"name": queue, "timeout_ms": 60_000}).status_code == 201
        task_id = pig.add(queue)
        out, err = worker.communicate(timeout=60)
        assert (worker.returncode, out.splitlines()) == (0, [f"done {task_id}"]), err
    finally:
        worker.kill()
        worker.wait()
    # With --idle-exit it gives up waiting after that long.
    never = ["--target", f"127.0.0.1:{node.ports.core}", "--queue", "never", "--idle-exit", "0.5"]
    gone = subprocess.run(
        [sys.executable, str(EXAMPLES / "lease_worker.py"), *never],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def test_claim_conflict_is_409(pig: Pigtail) -> None:
    queue = pig.create(timeout_ms=60_000)
    task_id = pig.add(queue, info={"foo": "bar", "abc": {"z": 1, "a": 2}})
    first = pig.claim(queue, task_id, "w1")
    assert first.status_code == 200
    assert first.json() == {
        "task_name": "hello_world",
        "state": "working",
        "info": {"foo": "bar", "abc": {"z": 1, "a": 2}},
        "worker": "w1",
    }
    assert list(first.json()["info"]) == ["abc", "foo"] and list(first.json()["info"]["abc"]) == ["a", "z"]
    second = pig.claim(queue, task_id, "w2")
    assert second.status_code == 409 and "w1" in second.json()["message"]
    assert pig.claim(queue, task_id, "w1").status_code == 200  # the holder renews
    assert pig.listing(queue) == {task_id: {"task_name": "hello_world", "state": "working"}}
    assert pig.done(queue, task_id, "w1").status_code == 200
    done = pig.claim(queue, task_id, "w2")
    assert done.status_code == 409 and "done" in done.json()["message"]
    assert pig.claim(queue, str(uuid.uuid4()), "w2").status_code == 404
    assert pig.done(queue, str(uuid.uuid4()), "w2").status_code == 404


def test_expired_claim_goes_back_to_pending(pig: Pigtail) -> None:
    queue = pig.create(timeout_ms=300)
    task_id = pig.add(queue)
    assert pig.claim(queue, task_id, "slow").status_code == 200
    wait_for_sync(lambda: pig.listing(queue)[task_id]["state"] == "pending", message="claim expiry")
    assert pig.task(queue, task_id)["state"] == "pending"
    taken = pig.claim(queue, task_id, "fast")
    assert taken.status_code == 200 and taken.json()["worker"] == "fast"
    late = pig.http.post(f"/queue/{queue}/{task_id}/heartbeat", json={"worker_id": "slow"})
    assert late.status_code == 409


def test_done_tasks_leave_the_list(pig: Pigtail) -> None:
    queue = pig.create()
    ids = [pig.add(queue) for _ in range(3)]
    assert set(pig.listing(queue)) == set(ids)
    assert pig.done(queue, ids[1], "w").status_code == 200
    assert set(pig.listing(queue)) == {ids[0], ids[2]}
    assert pig.task(queue, ids[1])["state"] == "done"
    # Done without a worker id (an empty body) works too, and a second done changes nothing.
    assert pig.http.request("DELETE", f"/queue/{queue}/{ids[0]}").status_code == 200
    assert pig.done(queue, ids[0], "w").status_code == 200
    assert set(pig.listing(queue)) == {ids[2]}


def test_delete_queue(pig: Pigtail) -> None:
    queue = pig.create()
    task_id = pig.add(queue)
    assert pig.http.delete(f"/queue/{queue}").status_code == 200
    assert pig.http.get(f"/queue/{queue}").status_code == 404
    assert pig.http.get(f"/queue/{queue}/{task_id}").status_code == 404
    assert pig.http.post(f"/queue/{queue}", json={"task_name": "x", "info": 1}).status_code == 404
    assert pig.http.delete(f"/queue/{queue}").status_code == 404
    assert queue not in pig.http.get("/queue").json()
    # Created again, it is a fresh, empty queue.
    assert pig.http.post("/create", json={"name": queue, "timeout_ms": 10}).status_code == 201
    assert pig.listing(queue) == {}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/create", {"name": "bad name", "timeout_ms": 1000}, "queue name"),
        ("/create", {"name": "x" * 200, "timeout_ms": 1000}, "queue name"),
        ("/create", {"name": "ok", "timeout_ms": -5}, "timeout_ms"),
        ("/create", {"name": "ok", "timeout_ms": 10**12}, "timeout_ms"),
        ("/create", {"name": "ok"}, "timeout_ms is required"),
        ("/create", {"timeout_ms": 100}, "queue name"),
        ("/create", {"name": "ok", "timeout_ms": 100, "max_attempts": 0}, "max_attempts"),
        ("/create", {"name": "ok", "timeout_ms": "soon"}, "timeout_ms"),
        ("/create", [1, 2], ""),
        ("/queue/QUEUE", {"info": {}}, "task_name is required"),
        ("/queue/QUEUE", {"task_name": "x", "delay_ms": -1}, "delay_ms"),
        ("/queue/QUEUE", {"task_name": "x", "priority": 10**8}, "priority"),
        ("/queue/QUEUE", {"task_name": "x" * 300}, "task_name"),
    ],
)
def test_bad_input_is_400_and_appends_nothing(pig: Pigtail, path: str, body: Any, message: str) -> None:
    queue = pig.create()
    node_id = httpx.get(f"{pig.node.url}/status", timeout=10).json()["node_id"]
    head = httpx.get(f"{pig.node.url}/log", timeout=10).json()[node_id]
    response = pig.http.post(path.replace("QUEUE", queue), json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert httpx.get(f"{pig.node.url}/log", timeout=10).json()[node_id] == head  # nothing appended here


def _head(pig: Pigtail) -> str:
    """Id of the newest entry this node appended."""
    node_id = httpx.get(f"{pig.node.url}/status", timeout=10).json()["node_id"]
    head: str = httpx.get(f"{pig.node.url}/log", timeout=10).json()[node_id]
    return head


@pytest.mark.parametrize(
    ("method", "path", "content", "message"),
    [
        ("POST", "/queue/QUEUE", b'{"task_name": "x", "priorty": 5}', "unknown members: 'priorty'"),
        ("POST", "/queue/QUEUE", b"{'task_name': 'x'}", "not valid JSON"),
        ("POST", "/queue/QUEUE", b'{"task_name": "x",}', "not valid JSON"),
        ("POST", "/queue/QUEUE", b'{"task_name": "x", "info": NaN}', "not valid JSON"),
        ("POST", "/queue/QUEUE", b'{"task_name": "x"} {}', "not valid JSON"),
        ("POST", "/queue/QUEUE", b"", "must be JSON"),
        ("POST", "/queue/QUEUE", b'{"task_name": ["x"]}', "task_name must be a string"),
        ("POST", "/queue/QUEUE", b'{"task_name": "x", "priority": 1.5}', "priority must be an integer"),
        ("PUT", "/queue/QUEUE/TASK", b'{"worker_id": 7}', "worker_id must be a string"),
        ("PUT", "/queue/QUEUE/TASK", b"", "must be JSON"),
        ("PUT", "/queue/QUEUE/TASK", b'"w"', "must be a JSON object"),
        ("DELETE", "/queue/QUEUE/TASK", b'{"worker": "w"}', "unknown members: 'worker'"),
        ("DELETE", "/queue/QUEUE/TASK", b"[]", "must be a JSON object"),
        ("POST", "/queue/QUEUE/claim", b'{"worker_id": "w", "wait_ms": "1 s"}', "wait_ms must be an integer"),
        ("POST", "/queue/QUEUE/TASK/heartbeat", b'{"worker_id": "w", "for_ms": 1}', "unknown members"),
        ("POST", "/queue/QUEUE/TASK/retry", b"", "must be JSON"),
        ("POST", "/create", b'{"name": "x", "timeout_ms": 1000, "max_attempts": "3 "}', "max_attempts"),
        ("POST", "/create", b'{"name": "x", "timeout": 1000}', "unknown members: 'timeout'"),
    ],
)
def test_bad_raw_bodies_are_400_and_append_nothing(
    pig: Pigtail, method: str, path: str, content: bytes, message: str
) -> None:
    """The write paths take their bodies raw (no JSON check in the gateway): the node refuses bad ones."""
    queue = pig.create()
    task_id = pig.add(queue)
    head = _head(pig)
    response = pig.http.request(
        method, path.replace("QUEUE", queue).replace("TASK", task_id), content=content
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert _head(pig) == head


def test_raw_bodies_read_like_before(pig: Pigtail) -> None:
    """Null members are absent, integers may be strings, the path's own members are ignored, and a done
    needs no body."""
    queue = f"q-{uuid.uuid4().hex[:12]}"
    assert pig.http.post("/create", json={"name": queue, "timeout_ms": "60000"}).status_code == 201
    added = {"task_name": "t", "info": None, "priority": "3", "delay_ms": None, "queue": "elsewhere"}
    response = pig.http.post(f"/queue/{queue}", json=added)
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    assert pig.http.get(f"/queue/{queue}/{task_id}", params={"verbose": "true"}).json()["priority"] == 3
    assert (
        pig.http.put(f"/queue/{queue}/{task_id}", json={"worker_id": "w", "task_id": "x"}).status_code == 200
    )
    done = pig.http.delete(f"/queue/{queue}/{task_id}")
    assert done.status_code == 200 and done.json()["state"] == "done"


def test_bad_claims_are_400(pig: Pigtail) -> None:
    queue = pig.create()
    task_id = pig.add(queue)
    response = pig.claim(queue, task_id, "")
    assert response.status_code == 400 and "worker_id" in response.json()["message"]
    assert pig.http.put(f"/queue/{queue}/{task_id}").status_code == 400  # no body
    assert pig.http.get("/queue/not%20a%20name").status_code == 400
    assert pig.http.post("/create", json={"name": queue, "timeout_ms": 5}).status_code == 409


def test_release_gives_a_task_back_at_once(pig: Pigtail) -> None:
    queue = pig.create(timeout_ms=60_000)
    task_id = pig.add(queue, info={"foo": "bar"})
    assert pig.claim(queue, task_id, "w").status_code == 200
    refused = pig.http.post(f"/queue/{queue}/{task_id}/release", json={"worker_id": "x"})
    assert refused.status_code == 409 and "holds no unexpired lease" in refused.json()["message"]
    released = pig.http.post(f"/queue/{queue}/{task_id}/release", json={"worker_id": "w"})
    assert released.status_code == 200 and released.json() == {
        "task_name": "hello_world",
        "state": "pending",
        "info": {"foo": "bar"},
        "worker": "w",
    }
    assert pig.listing(queue) == {task_id: {"task_name": "hello_world", "state": "pending"}}
    assert pig.claim(queue, task_id, "x").status_code == 200
    assert pig.http.post(f"/queue/{queue}/{task_id}/release", json={}).status_code == 400
    assert pig.http.post(f"/queue/{queue}/nope/release", json={"worker_id": "x"}).status_code == 404


def test_heartbeat_dead_letter_and_retry(pig: Pigtail) -> None:
    queue = pig.create(timeout_ms=300, max_attempts=1)
    task_id = pig.add(queue)
    assert pig.claim(queue, task_id, "w").status_code == 200
    beat = pig.http.post(f"/queue/{queue}/{task_id}/heartbeat", json={"worker_id": "w"})
    assert beat.status_code == 200 and beat.json()["state"] == "working"
    assert pig.http.post(f"/queue/{queue}/{task_id}/heartbeat", json={"worker_id": "x"}).status_code == 409
    wait_for_sync(lambda: pig.http.get(f"/queue/{queue}/dead").json() != {}, message="dead letter")
    assert pig.http.get(f"/queue/{queue}/dead").json() == {
        task_id: {"task_name": "hello_world", "state": "dead"}
    }
    assert pig.listing(queue) == {}
    assert pig.claim(queue, task_id, "w").status_code == 409
    retried = pig.http.post(f"/queue/{queue}/{task_id}/retry", json={})
    assert retried.status_code == 200 and retried.json()["state"] == "pending"
    assert pig.http.post(f"/queue/{queue}/{task_id}/retry", json={}).status_code == 409
    verbose = pig.http.get(f"/queue/{queue}/{task_id}", params={"verbose": "true"}).json()
    assert verbose["attempts"] == 0 and verbose["max_attempts"] == 1 and verbose["id"] == task_id


def test_delay_priority_idempotency_and_claim_next(pig: Pigtail) -> None:
    queue = pig.create(timeout_ms=60_000)
    low = pig.add(queue, "job")
    high = pig.add(queue, "job", priority=5)
    later = pig.add(queue, "job", delay_ms=60_000, priority=9)
    assert pig.listing(queue)[later]["state"] == "delayed"
    assert pig.claim(queue, later, "w").status_code == 409
    again = pig.http.post(f"/queue/{queue}", json={"task_name": "job", "idempotency_key": "k1"})
    repeat = pig.http.post(f"/queue/{queue}", json={"task_name": "job", "idempotency_key": "k1"})
    assert again.status_code == 201 and repeat.status_code == 200
    assert (
        repeat.json()["id"] == again.json()["id"] and repeat.headers["location"] == again.headers["location"]
    )
    order = []
    for _ in range(3):
        response = pig.http.post(f"/queue/{queue}/claim", json={"worker_id": "w"})
        assert response.status_code == 200
        order.append(response.json()["id"])
    assert order == [high, low, again.json()["id"]]
    empty = pig.http.post(f"/queue/{queue}/claim", json={"worker_id": "w", "wait_ms": 100})
    assert empty.status_code == 204 and empty.content == b""


def test_grpc_lease_stream_through_envoy(pig: Pigtail, node: NodeProcess) -> None:
    queue = pig.create(timeout_ms=60_000)
    task_id = pig.add(queue, info=[1, 2])
    with grpc.insecure_channel(f"127.0.0.1:{node.ports.core}") as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        stream = stub.LeaseTasks(pigtail_pb2.LeaseTasksRequest(queue=queue, worker_id="g"), timeout=30)
        message = next(stream)
        assert message.task.task_id == task_id and message.task.worker == "g"
        stream.cancel()
    assert pig.task(queue, task_id)["worker"] == "g"


def test_grpc_work_stream_through_envoy(pig: Pigtail, node: NodeProcess) -> None:
    """WorkTasks through port B: tasks come in and are completed on the same stream, which ends once
    the worker closes its side."""
    queue = pig.create(timeout_ms=60_000)
    task_ids = {pig.add(queue, info={"n": n}) for n in range(3)}
    requests: SimpleQueue[pigtail_pb2.WorkTasksRequest | None] = SimpleQueue()
    requests.put(
        pigtail_pb2.WorkTasksRequest(start=pigtail_pb2.LeaseTasksRequest(queue=queue, worker_id="g"))
    )
    completed: set[str] = set()
    with grpc.insecure_channel(f"127.0.0.1:{node.ports.core}") as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        stream = stub.WorkTasks(iter(requests.get, None), timeout=30)
        for message in stream:
            if message.HasField("task"):
                requests.put(pigtail_pb2.WorkTasksRequest(complete_task_id=message.task.task_id))
            else:
                completed.add(message.completed.task.task_id)
                if completed == task_ids:
                    requests.put(None)  # closes our side
        assert stream.code() == grpc.StatusCode.OK
    for task_id in task_ids:
        assert pig.task(queue, task_id)["state"] == "done"
