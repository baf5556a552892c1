"""ipc: transport between processes — a shared-memory ring with a ZMQ overflow path."""

from ipc.message_queue import MessageQueue, MessageQueueHandle
from ipc.reader import PeerClosedError, PeerDiedError
from ipc.zmq_context import new_context

__all__ = ["MessageQueue", "MessageQueueHandle", "PeerClosedError", "PeerDiedError", "new_context"]
