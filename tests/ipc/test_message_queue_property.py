"""Property: any sequence of payloads comes out identical and in order at every reader."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ipc_helpers import Peers
from ipc_peer import End, digest, make_message

from ipc import MessageQueue

CHUNK = 512

# Sizes cluster around the chunk size so that ring, boundary and overflow cases all come up.
sizes = st.one_of(
    st.integers(0, 64),
    st.integers(CHUNK - 16, CHUNK + 16),
    st.integers(0, 4 * CHUNK),
)
messages = st.lists(
    st.tuples(st.sampled_from(["raw", "array", "view", "item"]), st.integers(0, 2**32), sizes),
    max_size=24,
)


@pytest.fixture(scope="module")
def broadcast():
    """One writer here and three reader processes, reused by every example."""
    group = Peers()
    writer = MessageQueue(3, max_chunk_bytes=CHUNK, max_chunks=4)
    try:
        readers = group.attached_readers(writer.export_handle())
        writer.wait_for_readers(10)
        yield writer, readers
        writer.enqueue(End(final=True))
        for reader in readers:
            assert reader.next() == {"digests": []}
            assert reader.wait() == 0
    finally:
        writer.close()
        group.stop_all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=messages)
def test_any_sequence_arrives_identical_and_in_order_at_every_reader(broadcast, batch):
    writer, readers = broadcast
    for kind, seq, size in batch:
        writer.enqueue(make_message(kind, seq, size), timeout=30)
    writer.enqueue(End())
    want = [digest(make_message(kind, seq, size)) for kind, seq, size in batch]
    for reader in readers:
        assert reader.next() == {"digests": want}
