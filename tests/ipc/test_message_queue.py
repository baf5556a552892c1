"""MessageQueue's API in one process: payload types, errors, timeouts, close, names, fileno."""

from __future__ import annotations

import array
import asyncio
import os
import select
import stat
import time

import msgspec
import pytest
from ipc_peer import Item

from ipc import MessageQueue, MessageQueueHandle, PeerClosedError, PeerDiedError


@pytest.fixture
def pair(peers):
    """A writer and one attached reader (decoding Item), closed afterwards."""
    writer = MessageQueue(1, max_chunk_bytes=1024, max_chunks=4)
    reader = MessageQueue.attach(writer.export_handle(), 0, Item)
    writer.wait_for_readers(5)
    yield writer, reader
    reader.close()
    writer.close()


def test_handle_survives_msgspec_json_and_msgpack(peers):
    with MessageQueue(2) as writer:
        handle = writer.export_handle()
        for codec in (msgspec.json, msgspec.msgpack):
            assert codec.decode(codec.encode(handle), type=MessageQueueHandle) == handle
        assert handle.writer_pid == os.getpid()


def test_every_payload_type_arrives_as_sent(pair):
    writer, reader = pair
    data = os.urandom(300)
    ints = array.array("i", range(50))
    sent = [data, bytearray(data), memoryview(data), memoryview(ints), b"", Item(7, data)]
    for msg in sent:
        writer.enqueue(msg)
        got = reader.dequeue(timeout=5)
        if isinstance(msg, Item):
            assert got == msg
        else:
            assert type(got) is bytes and got == bytes(msg)


def test_reader_without_msg_type_gets_plain_msgpack_values(peers):
    with MessageQueue(1) as writer:
        with MessageQueue.attach(writer.export_handle(), 0) as reader:
            writer.enqueue(Item(3, b"abc"))
            assert reader.dequeue(timeout=5) == ["item", 3, b"abc"]


class WithRaw(msgspec.Struct, array_like=True):
    n: int
    raw: msgspec.Raw


def test_raw_fields_stay_intact_after_their_chunk_is_reused(peers):
    # msgspec decodes Raw as a view of its input: the reader must not hand out views of a chunk.
    with MessageQueue(1, max_chunk_bytes=256, max_chunks=1) as writer:
        with MessageQueue.attach(writer.export_handle(), 0, WithRaw) as reader:
            writer.enqueue(WithRaw(1, msgspec.Raw(msgspec.msgpack.encode([1, 2, 3]))))
            first = reader.dequeue(timeout=5)
            writer.enqueue(WithRaw(2, msgspec.Raw(msgspec.msgpack.encode([9, 9, 9]))))
            assert reader.dequeue(timeout=5).n == 2
            assert msgspec.msgpack.decode(first.raw) == [1, 2, 3]


def test_bad_arguments_raise_errors_naming_the_value(peers):
    for kwargs, match in [
        (dict(n_reader=0), "n_reader"),
        (dict(n_reader=1, max_chunk_bytes=-1), "max_chunk_bytes"),
        (dict(n_reader=1, max_chunks="4"), "max_chunks"),
        (dict(n_reader=True), "n_reader"),
        (dict(n_reader=1, spin_s=-1.0), "spin_s"),
    ]:
        with pytest.raises(ValueError, match=match):
            MessageQueue(**kwargs)
    with MessageQueue(2) as writer:
        handle = writer.export_handle()
        with pytest.raises(ValueError, match="rank must be an int in \\[0, 2\\), got 2"):
            MessageQueue.attach(handle, 2)
        with pytest.raises(TypeError, match="MessageQueueHandle"):
            MessageQueue.attach({"shm_path": handle.shm_path}, 0)
        with pytest.raises(TypeError, match="got int"):
            writer.enqueue(123)
        with pytest.raises(ValueError, match="C-contiguous"):
            writer.enqueue(memoryview(b"abcdef")[::2])
        with pytest.raises(ValueError, match="timeout"):
            writer.wait_for_readers(timeout=-1)
        with pytest.raises(ValueError, match="got '1'"):
            writer.enqueue(b"x", timeout="1")
        with pytest.raises(TypeError, match="for readers"):
            writer.dequeue()
        with MessageQueue.attach(handle, 0) as reader:
            with pytest.raises(TypeError, match="for the writer"):
                reader.enqueue(b"x")
            with pytest.raises(ValueError, match="already attached"):
                MessageQueue.attach(handle, 0)
            with pytest.raises(ValueError, match="timeout"):
                reader.dequeue(timeout=-0.5)
        with pytest.raises(ValueError, match="closed"):
            reader.dequeue()
        with pytest.raises(ValueError, match="rank 0 is already attached"):
            MessageQueue.attach(handle, 0)  # a closed rank cannot start over mid-ring
    with pytest.raises(ValueError, match="closed"):
        writer.enqueue(b"x")


def test_full_shm_is_a_clear_error_not_a_crash(peers):
    with pytest.raises(OSError, match="cannot reserve"):
        MessageQueue(1, max_chunk_bytes=1 << 40, max_chunks=4)


def test_pure_blocking_mode_delivers_without_spinning(peers):
    with MessageQueue(1, spin_s=0) as writer:
        with MessageQueue.attach(writer.export_handle(), 0, Item, spin_s=0) as reader:
            for seq in range(5):
                writer.enqueue(Item(seq, b"x"))
                assert reader.dequeue(timeout=5).seq == seq


def test_spin_follows_the_peers_pace_within_bounds(pair):
    """A reader whose messages come a few hundred µs apart spins that long instead of paying
    a wake-up each time; a pause longer than MAX_SPIN_S brings it back to spin_s."""
    from ipc.reader import MAX_SPIN_S

    _, reader = pair
    base = reader._spin_s
    reader._adapt_spin(300e-6)
    assert reader._spin_budget == pytest.approx(600e-6)
    reader._adapt_spin(0.9 * MAX_SPIN_S)
    assert reader._spin_budget == MAX_SPIN_S
    reader._adapt_spin(1e-6)
    assert reader._spin_budget == base
    reader._adapt_spin(300e-6)
    reader._adapt_spin(5 * MAX_SPIN_S)  # traffic paused: no more long spins
    assert reader._spin_budget == base


def test_segment_is_owner_only_and_names_go_once_all_readers_attach(peers):
    writer = MessageQueue(2)
    handle = writer.export_handle()
    assert stat.S_IMODE(os.stat(handle.shm_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(handle.sock_dir).st_mode) == 0o700
    readers = [MessageQueue.attach(handle, rank) for rank in range(2)]
    writer.wait_for_readers(5)
    assert not os.path.exists(handle.shm_path)
    assert not os.path.exists(handle.sock_dir)
    writer.enqueue(b"after unlink")  # the mappings outlive the names
    assert [r.dequeue(timeout=5) for r in readers] == [b"after unlink"] * 2
    for queue in (*readers, writer):
        queue.close()
        queue.close()  # idempotent


def test_close_without_readers_leaves_no_segment_or_socket_file(peers):
    writer = MessageQueue(3, max_chunk_bytes=4096)
    handle = writer.export_handle()
    assert sorted(os.listdir(handle.sock_dir)) == [
        "overflow",
        "wake-0",
        "wake-1",
        "wake-2",
        "wake-writer",
    ]
    writer.close()
    assert not os.path.exists(handle.shm_path)
    assert not os.path.exists(handle.sock_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MessageQueue.attach(handle, 0)


def test_wait_for_readers_names_the_missing_ranks(peers):
    with MessageQueue(3) as writer:
        with MessageQueue.attach(writer.export_handle(), 1):
            with pytest.raises(TimeoutError, match=r"readers \[0, 2\]"):
                writer.wait_for_readers(timeout=0.2)


def test_dequeue_times_out_and_nowait_returns_none(pair):
    _, reader = pair
    assert reader.dequeue_nowait() is None
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="0.2"):
        reader.dequeue(timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 1.0


def test_full_ring_enqueue_times_out_while_reader_lives(pair):
    writer, reader = pair
    for seq in range(4):
        writer.enqueue(Item(seq, b"x"))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"readers \[0\]"):
        writer.enqueue(Item(4, b"x"), timeout=0.3)
    assert 0.29 <= time.monotonic() - start < 1.5
    assert [reader.dequeue(timeout=1).seq for _ in range(4)] == [0, 1, 2, 3]


def test_full_ring_enqueue_raises_once_the_lagging_reader_closed(pair):
    writer, reader = pair
    for _ in range(4):
        writer.enqueue(b"x")
    reader.close()
    with pytest.raises(PeerClosedError, match=f"reader rank 0 \\(pid {os.getpid()}\\) closed"):
        writer.enqueue(b"x", timeout=5)


def test_readers_drain_what_was_sent_then_learn_the_writer_closed(pair):
    writer, reader = pair
    writer.enqueue(Item(1, b"a"))
    writer.enqueue(Item(2, b"b" * 5000))  # overflow
    writer.close()
    assert reader.dequeue(timeout=5).seq == 1
    assert reader.dequeue(timeout=5).data == b"b" * 5000
    for _ in range(2):
        with pytest.raises(PeerClosedError, match="closed the queue"):
            reader.dequeue(timeout=5)
    with pytest.raises(PeerDiedError):  # PeerClosedError is a PeerDiedError
        reader.dequeue_nowait()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_writer_closing_before_all_readers_attached_wakes_the_attached_ones(peers):
    writer = MessageQueue(2)
    with MessageQueue.attach(writer.export_handle(), 0) as reader:
        assert not _readable(reader.fileno())
        writer.close()
        assert _readable(reader.fileno())
        with pytest.raises(PeerClosedError, match="closed the queue"):
            reader.dequeue_nowait()


def test_fileno_is_readable_exactly_while_messages_wait(pair):
    writer, reader = pair
    fd = reader.fileno()
    assert not _readable(fd)
    writer.enqueue(Item(1, b"a"))
    writer.enqueue(Item(2, b"b"))
    assert _readable(fd)
    assert [reader.dequeue_nowait().seq, reader.dequeue_nowait().seq] == [1, 2]
    assert reader.dequeue_nowait() is None
    assert not _readable(fd)
    writer.enqueue(Item(3, b"c"))
    assert _readable(fd)


def test_asyncio_add_reader_gets_every_message_without_spinning(pair):
    writer, reader = pair
    got: list[int] = []
    wakeups = 0

    def on_readable() -> None:
        nonlocal wakeups
        wakeups += 1
        while (msg := reader.dequeue_nowait()) is not None:
            got.append(msg.seq)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.add_reader(reader.fileno(), on_readable)
        for seq in range(20):
            writer.enqueue(Item(seq, b"x"))
            await asyncio.sleep(0.002 if seq % 3 else 0)
        await asyncio.sleep(0.05)
        idle_start = wakeups
        await asyncio.sleep(0.3)  # nothing sent: a spinning loop would call back constantly
        loop.remove_reader(reader.fileno())
        return wakeups - idle_start

    idle_wakeups = asyncio.run(main())
    assert got == list(range(20))
    assert idle_wakeups == 0
    assert wakeups <= 20
