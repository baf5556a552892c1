"""ipc: transport between processes — a shared-memory ring with a ZMQ overflow path."""

from ipc.message_queue import MessageQueue, MessageQueueHandle
from ipc.reader import PeerClosedError, PeerDiedError

__all__ = ["MessageQueue", "MessageQueueHandle", "PeerClosedError", "PeerDiedError"]
