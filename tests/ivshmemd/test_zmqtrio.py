"""Tests for the pyzmq <-> trio adapter, with real zmq sockets over ipc and inproc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from ivshmemd.zmqtrio import TrioSocket
from tests.wakeups import TaskSteps

#: Seconds of quiet watched for wake-ups (a window to observe, not a wait for anything).
OBSERVATION_WINDOW = 0.3
MESSAGES = 5
#: A receive parks on the fd once, then takes its cancel-shielded checkpoint.
WAKEUPS_PER_MESSAGE = 3
#: Wake-ups libzmq's signalling fd may cause without a message (its own commands).
SPURIOUS_WAKEUPS = 2


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def _pair(
    ctx: zmq.Context[zmq.Socket[bytes]], a: int, b: int, endpoint: str
) -> tuple[TrioSocket, TrioSocket]:
    server = ctx.socket(a)
    server.bind(endpoint)
    client = ctx.socket(b)
    client.connect(endpoint)
    return TrioSocket(server), TrioSocket(client)


async def test_many_messages_both_ways(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    router, dealer = _pair(ctx, zmq.ROUTER, zmq.DEALER, f"ipc://{tmp_path}/rd")
    count = 3000
    echoed: list[int] = []

    async def echo_server() -> None:
        for _ in range(count):
            ident, payload = await router.recv_multipart()
            await router.send_multipart([ident, payload + b"!"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo_server)
        # One task per socket: this task owns the dealer and interleaves bursts of sends
        # and receives, so both directions carry many messages in flight.
        sent = 0
        while len(echoed) < count:
            burst = min(100, count - sent)
            for _ in range(burst):
                await dealer.send_multipart([str(sent).encode()])
                sent += 1
            for _ in range(burst):
                (reply,) = await dealer.recv_multipart()
                assert reply.endswith(b"!")
                echoed.append(int(reply[:-1]))
    assert echoed == list(range(count))
    router.close()
    dealer.close()


async def test_concurrent_sockets(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pairs = [_pair(ctx, zmq.PAIR, zmq.PAIR, f"inproc://pair{i}") for i in range(8)]
    per_pair = 500
    received: dict[int, list[int]] = {i: [] for i in range(len(pairs))}

    async def produce(sock: TrioSocket, index: int) -> None:
        for n in range(per_pair):
            await sock.send_multipart([index.to_bytes(2, "little"), n.to_bytes(4, "little")])

    async def consume(sock: TrioSocket, index: int) -> None:
        for _ in range(per_pair):
            tag, value = await sock.recv_multipart()
            assert int.from_bytes(tag, "little") == index
            received[index].append(int.from_bytes(value, "little"))

    async with trio.open_nursery() as nursery:
        for i, (a, b) in enumerate(pairs):
            nursery.start_soon(consume, b, i)
            nursery.start_soon(produce, a, i)
    for i in range(len(pairs)):
        assert received[i] == list(range(per_pair))
    for a, b in pairs:
        a.close()
        b.close()


async def test_cancel_while_waiting_loses_nothing(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    a, b = _pair(ctx, zmq.PAIR, zmq.PAIR, "inproc://cancel")
    outcome: list[str] = []

    async def waiter(scope_box: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            await b.recv_multipart()
            outcome.append("received")
        if scope.cancelled_caught:
            outcome.append("cancelled")

    box: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, box)
        await trio.testing.wait_all_tasks_blocked()
        box[0].cancel()
    assert outcome == ["cancelled"]
    # The socket is still usable and the next message arrives intact.
    await a.send_multipart([b"after", b"cancel"])
    assert await b.recv_multipart() == [b"after", b"cancel"]
    a.close()
    b.close()


async def test_cancelled_before_start_leaves_message_queued(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    a, b = _pair(ctx, zmq.PAIR, zmq.PAIR, "inproc://queued")
    await a.send_multipart([b"kept"])
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.recv_multipart()
    assert scope.cancelled_caught
    assert await b.recv_multipart() == [b"kept"]
    a.close()
    b.close()


async def test_pub_sub_stream_has_no_loss(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    endpoint = f"ipc://{tmp_path}/ev"
    pub_raw = ctx.socket(zmq.XPUB)
    pub_raw.setsockopt(zmq.SNDHWM, 0)
    pub_raw.bind(endpoint)
    sub_raw = ctx.socket(zmq.SUB)
    sub_raw.setsockopt(zmq.RCVHWM, 0)
    sub_raw.setsockopt(zmq.SUBSCRIBE, b"")
    sub_raw.connect(endpoint)
    pub, sub = TrioSocket(pub_raw), TrioSocket(sub_raw)
    # XPUB hands us the subscription: from then on nothing published is dropped.
    assert await pub.recv_multipart() == [b"\x01"]
    count = 10_000
    got: list[int] = []

    async def subscriber() -> None:
        for _ in range(count):
            topic, body = await sub.recv_multipart()
            assert topic == b"n"
            got.append(int.from_bytes(body, "little"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber)
        for i in range(count):
            await pub.send_multipart([b"n", i.to_bytes(4, "little")])
    assert got == list(range(count))
    pub.close()
    sub.close()


async def test_send_waits_for_a_peer_then_completes(
    ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    """PUSH with no connected peer cannot send: the adapter parks on POLLOUT, not a loop."""
    endpoint = f"ipc://{tmp_path}/push"
    push_raw = ctx.socket(zmq.PUSH)
    push_raw.setsockopt(zmq.IMMEDIATE, 1)  # no queueing before a peer is connected
    push_raw.connect(endpoint)
    push = TrioSocket(push_raw)
    assert push.try_send_multipart([b"x"]) is False
    done: list[bool] = []

    async def send() -> None:
        await push.send_multipart([b"hello"])
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        pull_raw = ctx.socket(zmq.PULL)
        pull_raw.bind(endpoint)
        pull = TrioSocket(pull_raw)
        assert await pull.recv_multipart() == [b"hello"]
    assert done == [True]
    push.close()
    pull.close()


async def test_a_waiting_task_wakes_only_for_its_messages(
    ctx: zmq.Context[zmq.Socket[bytes]], task_steps: TaskSteps
) -> None:
    """Counted, not timed: while nothing arrives the waiter never runs (a poller or a spinner
    would run all through the window); then it runs a bounded number of times per message."""
    a, b = _pair(ctx, zmq.PAIR, zmq.PAIR, "inproc://idle")
    received: list[list[bytes]] = []

    async def receive(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        task_status.started(trio.lowlevel.current_task())
        for _ in range(MESSAGES):
            received.append(await b.recv_multipart())

    async with trio.open_nursery() as nursery:
        waiter = await nursery.start(receive)
        await trio.testing.wait_all_tasks_blocked()
        parked = task_steps.of(waiter)
        await trio.sleep(OBSERVATION_WINDOW)  # nothing to receive: it must not run
        idle = task_steps.of(waiter) - parked
        for index in range(MESSAGES):
            await a.send_multipart([b"%d" % index])
    busy = task_steps.of(waiter) - parked - idle
    assert received == [[b"%d" % index] for index in range(MESSAGES)]
    assert idle <= SPURIOUS_WAKEUPS, idle
    assert busy <= WAKEUPS_PER_MESSAGE * MESSAGES + SPURIOUS_WAKEUPS, busy
    a.close()
    b.close()


async def test_second_task_on_one_socket_is_refused(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    a, b = _pair(ctx, zmq.PAIR, zmq.PAIR, "inproc://busy")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.recv_multipart)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await b.recv_multipart()
        await a.send_multipart([b"unblock"])
    a.close()
    b.close()


async def test_close_wakes_a_waiting_task(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    a, b = _pair(ctx, zmq.PAIR, zmq.PAIR, "inproc://close")
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await b.recv_multipart()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        b.close()
    assert len(errors) == 1
    assert b.closed
    with pytest.raises(trio.ClosedResourceError):
        await b.recv_multipart()
    b.close()  # idempotent
    a.close()
