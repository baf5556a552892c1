"""A reader or writer process for the ipc tests: driven by argv and stdin, reports on stdout.

reader: attaches, prints {"attached": pid}, then per End message prints the digests of the
messages since the previous End ({"digests": [...]}); a Stamp prints its delivery latency.
writer: creates a queue, prints {"handle": ...}, then runs JSON commands read from stdin.
Errors are printed as {"error": name, "message": text} (exit code 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time

import msgspec

from ipc import MessageQueue, MessageQueueHandle, PeerDiedError, shm_ring


class Item(msgspec.Struct, tag="item", array_like=True):
    seq: int
    data: bytes


class End(msgspec.Struct, tag="end", array_like=True):
    final: bool = False


class Stamp(msgspec.Struct, tag="stamp", array_like=True):
    t_ns: int  # time.monotonic_ns() when sent: one clock for every process


Message = Item | End | Stamp


def payload(seq: int, size: int) -> bytes:
    return random.Random(seq).randbytes(size)


def make_message(kind: str, seq: int, size: int) -> object:
    """'raw' -> bytes, 'array' -> bytearray, 'view' -> memoryview, 'item' -> Item."""
    data = payload(seq, size)
    return {
        "raw": lambda: data,
        "array": lambda: bytearray(data),
        "view": lambda: memoryview(data),
        "item": lambda: Item(seq, data),
    }[kind]()


def digest(msg: object) -> list:
    """What a reader reports per message: enough to tell any two payloads apart."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return ["b", len(msg), hashlib.sha1(msg).hexdigest()]
    if isinstance(msg, Item):
        return ["s", len(msg.data), hashlib.sha1(msgspec.msgpack.encode(msg)).hexdigest()]
    raise TypeError(f"unexpected message {type(msg).__name__}")


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_reader(args: argparse.Namespace) -> None:
    handle = msgspec.json.decode(args.handle, type=MessageQueueHandle)
    reader = MessageQueue.attach(handle, args.rank, Message, spin_s=args.spin)
    emit({"attached": os.getpid(), "tso_fences_skipped": shm_ring.TSO})
    if args.stall:
        time.sleep(3600)
    digests: list = []
    while True:
        msg = reader.dequeue(timeout=args.timeout)
        if args.delay:
            time.sleep(args.delay)
        if isinstance(msg, End):
            emit({"digests": digests})
            digests = []
            if msg.final:
                break
        elif isinstance(msg, Stamp):
            emit({"latency_us": (time.monotonic_ns() - msg.t_ns) / 1e3})
        else:
            digests.append(digest(msg))
    reader.close()


def run_writer(args: argparse.Namespace) -> None:
    writer = MessageQueue(args.n_reader, args.chunk_bytes, args.chunks)
    emit({"handle": msgspec.json.encode(writer.export_handle()).decode()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "wait":
            writer.wait_for_readers(30)
        elif op == "send":
            for kind, seq, size in cmd["items"]:
                writer.enqueue(make_message(kind, seq, size), timeout=30)
        elif op == "end":
            writer.enqueue(End(cmd.get("final", False)), timeout=30)
        elif op == "stamp":
            writer.enqueue(Stamp(time.monotonic_ns()), timeout=30)
        elif op == "close":
            writer.close()
        elif op == "exit":  # leave without close(): atexit must clean up
            break
        emit({"done": op})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    reader = sub.add_parser("reader")
    reader.add_argument("--handle", required=True)
    reader.add_argument("--rank", type=int, default=0)
    reader.add_argument("--delay", type=float, default=0.0)
    reader.add_argument("--spin", type=float, default=100e-6)
    reader.add_argument("--timeout", type=float, default=60.0)
    reader.add_argument("--stall", action="store_true", help="attach, then never read")
    writer = sub.add_parser("writer")
    writer.add_argument("--n-reader", type=int, default=1)
    writer.add_argument("--chunk-bytes", type=int, default=1024)
    writer.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    try:
        (run_reader if args.role == "reader" else run_writer)(args)
    except (PeerDiedError, TimeoutError) as e:
        emit({"error": type(e).__name__, "message": str(e)})
        sys.exit(3)


if __name__ == "__main__":
    main()
