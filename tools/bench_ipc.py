"""IPC microbenchmark: our shared-memory MessageQueue against pyzmq and multiprocessing.Pipe.

Ping-pong (one channel each way) and one-way streaming between two processes, for payloads
of 64 B, 4 KiB, 64 KiB, 1 MiB and 8 MiB (the last over the MessageQueue's ZMQ overflow path).
Payloads up to 4 KiB are a msgspec Struct that every transport encodes and decodes on each
hop; larger ones are raw bytes, which every transport hands to the application as `bytes`.
Nothing is pickled: the Pipe carries bytes through send_bytes/recv_bytes.

    python tools/bench_ipc.py --quick --json out.json
    python tools/bench_ipc.py --readers 1,2,4,8     # broadcast a SchedulerOutput to N readers

The machine may be shared: the CPU time other processes took during the run is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine_core.protocol import CachedRequestData, SchedulerOutput  # noqa: E402
from ipc import MessageQueue, MessageQueueHandle  # noqa: E402

SIZES = [64, 4 << 10, 64 << 10, 1 << 20, 8 << 20]
STRUCT_MAX = 4 << 10  # payloads up to here are a msgspec Struct
ACK = b"k"
TRANSPORTS = ["mq", "zmq", "pipe"]
NAMES = {"mq": "MessageQueue (shm)", "zmq": "pyzmq PAIR ipc://", "pipe": "multiprocessing.Pipe"}


class Blob(msgspec.Struct, array_like=True, gc=False):
    seq: int
    data: bytes


def make_payload(size: int) -> Blob | bytes:
    if size > STRUCT_MAX:
        return b"\xa5" * size
    data = b"\xa5" * size
    while len(msgspec.msgpack.encode(Blob(1, data))) > size:
        data = data[:-1]
    return Blob(1, data)


def plan(quick: bool) -> list[tuple[str, int, int]]:
    """(mode, payload bytes, iterations) in the order both processes run them."""
    ping = {64: 2000, 4 << 10: 2000, 64 << 10: 500, 1 << 20: 100, 8 << 20: 12}
    stream = {64: 20000, 4 << 10: 10000, 64 << 10: 2000, 1 << 20: 200, 8 << 20: 16}
    scale = 1 if quick else 8
    phases = []
    for size in SIZES:
        phases.append(("ping", size, ping[size] * scale))
        phases.append(("stream", size, stream[size] * scale))
    return phases


# ---------------------------------------------------------------- transports


class MQEnd:
    def __init__(self, tx: MessageQueue, rx: MessageQueue) -> None:
        self.tx, self.rx = tx, rx

    def send(self, obj: object) -> None:
        self.tx.enqueue(obj)

    def recv(self, struct: bool) -> object:
        return self.rx.dequeue()

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


class BytesEnd:
    """A bytes channel (pyzmq or Pipe) around which we encode and decode Structs ourselves."""

    def __init__(self, send_raw, recv_raw, close) -> None:
        self.send_raw, self.recv_raw, self.close = send_raw, recv_raw, close
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Blob)

    def send(self, obj: object) -> None:
        self.send_raw(obj if isinstance(obj, bytes) else self.enc.encode(obj))

    def recv(self, struct: bool) -> object:
        data = self.recv_raw()
        return self.dec.decode(data) if struct else data


def zmq_end(sock: zmq.Socket) -> BytesEnd:
    # Zero-copy sends only pay off for large messages (pyzmq's own advice).
    return BytesEnd(
        lambda data: sock.send(data, copy=len(data) < 65536), sock.recv, lambda: sock.close(0)
    )


def pipe_end(conn: Connection) -> BytesEnd:
    return BytesEnd(conn.send_bytes, conn.recv_bytes, conn.close)


CHILDREN: list[subprocess.Popen] = []


def spawn(role: str, arg: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", role, "--child-arg", arg]
    CHILDREN.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, pass_fds=pass_fds))
    return CHILDREN[-1]


# 2 MiB chunks: payloads up to 1 MiB (plus the message header) go through the ring, 8 MiB
# over the ZMQ overflow path, as the targets assume.
RING_CHUNK_BYTES = 2 << 20
RING_CHUNKS = 8


def open_parent_end(transport: str, phases: list, spin_s: float, tmp: str):
    """Start the echo child for `transport`; return (child, our end of the channel)."""
    arg = {"phases": phases, "spin_s": spin_s}
    if transport == "mq":
        down = MessageQueue(1, RING_CHUNK_BYTES, RING_CHUNKS, spin_s=spin_s)
        arg["handle"] = msgspec.json.encode(down.export_handle()).decode()
        child = spawn("echo-mq", json.dumps(arg))
        up_handle = msgspec.json.decode(child.stdout.readline(), type=MessageQueueHandle)
        up = MessageQueue.attach(up_handle, 0, Blob, spin_s=spin_s)
        down.wait_for_readers(60)
        return child, MQEnd(down, up)
    if transport == "zmq":
        sock = zmq.Context.instance().socket(zmq.PAIR)
        arg["addr"] = f"ipc://{tmp}/pair"
        sock.bind(arg["addr"])
        return spawn("echo-zmq", json.dumps(arg)), zmq_end(sock)
    ours, theirs = Pipe(duplex=True)
    arg["fd"] = theirs.fileno()
    child = spawn("echo-pipe", json.dumps(arg), pass_fds=(theirs.fileno(),))
    theirs.close()
    return child, pipe_end(ours)


def child_echo(role: str, arg: dict) -> None:
    if role == "echo-mq":
        down = MessageQueue.attach(
            msgspec.json.decode(arg["handle"], type=MessageQueueHandle),
            0,
            Blob,
            spin_s=arg["spin_s"],
        )
        up = MessageQueue(1, RING_CHUNK_BYTES, RING_CHUNKS, spin_s=arg["spin_s"])
        print(msgspec.json.encode(up.export_handle()).decode(), flush=True)
        up.wait_for_readers(60)
        end = MQEnd(up, down)
    elif role == "echo-zmq":
        sock = zmq.Context.instance().socket(zmq.PAIR)
        sock.connect(arg["addr"])
        end = zmq_end(sock)
    else:
        end = pipe_end(Connection(arg["fd"]))
    for mode, size, n in arg["phases"]:
        struct = size <= STRUCT_MAX
        if mode == "ping":
            for _ in range(n + warmup(n)):
                end.send(end.recv(struct))
        else:
            for _ in range(n):
                end.recv(struct)
            end.send(ACK)
    end.recv(False)  # the parent's goodbye: keeps our end open until it is done
    end.close()


def warmup(n: int) -> int:
    return max(5, n // 2)  # the first phases run cold otherwise (caches, CPU clocks)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_transport(transport: str, phases: list, spin_s: float, tmp: str) -> list[dict]:
    child, end = open_parent_end(transport, phases, spin_s, tmp)
    results = {}
    for mode, size, n in phases:
        msg, struct = make_payload(size), size <= STRUCT_MAX
        row = results.setdefault(size, {"transport": transport, "payload_bytes": size})
        if mode == "ping":
            rtts = []
            for k in range(n + warmup(n)):
                t0 = time.perf_counter_ns()
                end.send(msg)
                end.recv(struct)
                if k >= warmup(n):
                    rtts.append(time.perf_counter_ns() - t0)
            row["rtt_p50_us"] = percentile(rtts, 0.5) / 1e3
            row["rtt_p99_us"] = percentile(rtts, 0.99) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                end.send(msg)
            end.recv(False)
            elapsed = time.perf_counter() - t0
            row["msgs_per_s"] = n / elapsed
            row["mb_per_s"] = n * size / elapsed / 1e6
    end.send(ACK)
    child.wait(60)
    end.close()
    return list(results.values())


# ---------------------------------------------------------------- idle reader and wake-up


def measure_idle(idle_s: float, wakes: int, spin_s: float) -> tuple[float, float, list[float]]:
    """(reader CPU % while idle, median wake-up latency in µs, all latencies)."""
    q = MessageQueue(1, spin_s=spin_s)
    child = spawn("idle", json.dumps({"handle": msgspec.json.encode(q.export_handle()).decode()}))
    q.wait_for_readers(60)
    q.enqueue(Blob(0, b""))  # recent traffic: the reader spins first, then must go to sleep
    child.stdout.readline()
    clock = (~child.pid << 3) | 2  # the child's CPU-time clock (Linux)
    time.sleep(0.05)
    cpu0, t0 = time.clock_gettime(clock), time.monotonic()
    time.sleep(idle_s)
    cpu = (time.clock_gettime(clock) - cpu0) / (time.monotonic() - t0) * 100
    latencies = []
    for _ in range(wakes):
        time.sleep(0.3)
        q.enqueue(Blob(time.monotonic_ns(), b""))
        latencies.append(float(child.stdout.readline()))
    q.enqueue(b"bye")
    child.wait(60)
    q.close()
    return cpu, statistics.median(latencies), latencies


def child_idle(arg: dict) -> None:
    q = MessageQueue.attach(msgspec.json.decode(arg["handle"], type=MessageQueueHandle), 0, Blob)
    while isinstance(msg := q.dequeue(), Blob):
        print((time.monotonic_ns() - msg.seq) / 1e3, flush=True)
    q.close()


# ---------------------------------------------------------------- broadcast to N readers


def scheduler_output(n_reqs: int = 256) -> SchedulerOutput:
    """A decode step: every running request gets one token; one in 16 gets a new block."""
    reqs = [
        CachedRequestData(
            req_id=f"cmpl-{uuid.uuid4().hex}-0",
            new_token_ids=[1000 + i],
            new_block_ids=[5000 + i] if i % 16 == 0 else [],
            num_computed_tokens=300 + 7 * i,
        )
        for i in range(n_reqs)
    ]
    return SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=reqs,
        num_scheduled_tokens={r.req_id: 1 for r in reqs},
        total_num_scheduled_tokens=n_reqs,
    )


def run_broadcast(n_readers: int, transport: str, n: int, spin_s: float, tmp: str) -> dict:
    """Latency until the last of n_readers processes has decoded the step's SchedulerOutput."""
    ctx = zmq.Context.instance()
    acks = ctx.socket(zmq.PULL)
    ack_addr = f"ipc://{tmp}/ack-{transport}-{n_readers}"
    acks.bind(ack_addr)
    arg = {"ack": ack_addr, "spin_s": spin_s}
    if transport == "mq":
        q = MessageQueue(n_readers, spin_s=spin_s)
        arg["handle"] = msgspec.json.encode(q.export_handle()).decode()
    else:
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        arg["addr"] = f"ipc://{tmp}/pub-{n_readers}"
        pub.bind(arg["addr"])
    children = [
        spawn(f"bcast-{transport}", json.dumps(arg | {"rank": r})) for r in range(n_readers)
    ]
    if transport == "mq":
        q.wait_for_readers(120)
        send = q.enqueue
    else:
        for _ in range(n_readers):
            pub.recv()  # one subscription per reader: all connected
        enc = msgspec.msgpack.Encoder()

        def send(obj: SchedulerOutput) -> None:
            pub.send(enc.encode(obj))

    step = scheduler_output()
    lat = []
    for k in range(n + warmup(n)):
        t0 = time.monotonic_ns()
        send(step)
        last = max(int(acks.recv()) for _ in range(n_readers))
        if k >= warmup(n):
            lat.append((last - t0) / 1e3)
    send(SchedulerOutput([], [], {}, -1))  # stop
    for child in children:
        child.wait(60)
    if transport == "mq":
        q.close()
    else:
        pub.close(linger=0)
    acks.close(linger=0)
    return {
        "transport": transport,
        "n_readers": n_readers,
        "p50_us": percentile(lat, 0.5),
        "p99_us": percentile(lat, 0.99),
        "encoded_bytes": len(msgspec.msgpack.encode(step)),
    }


def child_bcast(role: str, arg: dict) -> None:
    ack = zmq.Context.instance().socket(zmq.PUSH)
    ack.connect(arg["ack"])
    if role == "bcast-mq":
        h = msgspec.json.decode(arg["handle"], type=MessageQueueHandle)
        q = MessageQueue.attach(h, arg["rank"], SchedulerOutput, spin_s=arg["spin_s"])
        recv = q.dequeue
    else:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.connect(arg["addr"])
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        dec = msgspec.msgpack.Decoder(SchedulerOutput)

        def recv() -> SchedulerOutput:
            return dec.decode(sub.recv())

    while recv().total_num_scheduled_tokens >= 0:
        ack.send(str(time.monotonic_ns()).encode())
    ack.close(linger=1000)


# ---------------------------------------------------------------- accounting and report


def busy_jiffies() -> int:
    """All CPUs' non-idle time since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def own_cpu_s() -> float:
    """CPU time of this process and of its children that have exited (all are, at the end)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def check_targets(rows: list[dict], idle_cpu: float, wake_us: float) -> list[tuple[str, bool]]:
    """The issue's targets for this run (benchmark only: they are not asserted anywhere)."""
    by = {(r["transport"], r["payload_bytes"]): r for r in rows}
    mq = {s: by[("mq", s)]["rtt_p50_us"] for s in SIZES if ("mq", s) in by}
    zq = {s: by[("zmq", s)]["rtt_p50_us"] for s in SIZES if ("zmq", s) in by}
    out = []
    for s in (64, 4 << 10):
        out.append((f"{s} B rtt p50 <= 5 us", mq[s] <= 5))
        out.append((f"{s} B rtt p50 <= pyzmq/10", mq[s] <= zq[s] / 10))
    out.append(("64 KiB rtt p50 <= 15 us", mq[64 << 10] <= 15))
    out.append(("1 MiB rtt p50 <= 100 us", mq[1 << 20] <= 100))
    out.append(("8 MiB rtt p50 <= pyzmq", mq[8 << 20] <= zq[8 << 20]))
    out.append(("idle reader < 1% of a core", idle_cpu < 1))
    out.append(("wake-up after idle < 1 ms", wake_us < 1000))
    return out


def size_label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    return f"{size >> 10} KiB" if size >= 1024 else f"{size} B"


def main_suite(args: argparse.Namespace, transports: list[str], tmp: str) -> dict:
    spin_s = args.spin_us / 1e6
    rows = []
    for transport in transports:
        rows += run_transport(transport, plan(args.quick), spin_s, tmp)
    print(f"{'transport':<22}{'payload':>9}{'rtt p50 us':>12}{'rtt p99 us':>12}"
          f"{'msgs/s':>12}{'MB/s':>10}")  # fmt: skip
    for r in rows:
        print(f"{NAMES[r['transport']]:<22}{size_label(r['payload_bytes']):>9}"
              f"{r['rtt_p50_us']:>12.1f}{r['rtt_p99_us']:>12.1f}"
              f"{r['msgs_per_s']:>12.0f}{r['mb_per_s']:>10.1f}")  # fmt: skip
    idle_s, wakes = (2.0, 5) if args.quick else (10.0, 20)
    idle_cpu, wake_us, all_wakes = measure_idle(idle_s, wakes, spin_s)
    print(f"idle reader: {idle_cpu:.3f}% of a core; wake-up after 300 ms idle: "
          f"median {wake_us:.0f} us (all: {', '.join(f'{w:.0f}' for w in all_wakes)})")  # fmt: skip
    report = {"results": rows, "idle_reader_cpu_percent": idle_cpu, "wake_after_idle_us": wake_us}
    if {"mq", "zmq"} <= set(transports):
        targets = check_targets(rows, idle_cpu, wake_us)
        report["targets"] = dict(targets)
        print("targets: " + "; ".join(f"{k}: {'ok' if ok else 'MISSED'}" for k, ok in targets))
    return report


def broadcast_suite(args: argparse.Namespace, counts: list[int], tmp: str) -> dict:
    n, rows = (200 if args.quick else 2000), []
    print(f"{'transport':<22}{'readers':>8}{'p50 us':>10}{'p99 us':>10}"
          "   (until the last reader has decoded the step)")  # fmt: skip
    for count in counts:
        for transport in ("mq", "zmq"):
            rows.append(r := run_broadcast(count, transport, n, args.spin_us / 1e6, tmp))
            name = NAMES["mq"] if transport == "mq" else "pyzmq PUB/SUB ipc://"
            print(f"{name:<22}{count:>8}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}", flush=True)
    print(f"SchedulerOutput with 256 CachedRequestData: {rows[0]['encoded_bytes']} bytes encoded")
    return {"broadcast": rows}


def run_child(role: str, arg: dict) -> None:
    if role.startswith("echo"):
        child_echo(role, arg)
    elif role == "idle":
        child_idle(arg)
    else:
        child_bcast(role, arg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--readers", metavar="N,N,...", help="broadcast mode instead, e.g. 1,2,4,8")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="subset of mq,zmq,pipe")
    parser.add_argument("--spin-us", type=float, default=100.0, help="MessageQueue spin (us)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-arg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, json.loads(args.child_arg))
    transports = args.transports.split(",")
    if bad := set(transports) - set(TRANSPORTS):
        parser.error(f"unknown transports {sorted(bad)}; choose from {TRANSPORTS}")
    counts = [int(x) for x in args.readers.split(",")] if args.readers else []
    if any(c < 1 for c in counts):
        parser.error(f"--readers takes positive reader counts, got {args.readers}")
    if args.spin_us < 0:
        parser.error(f"--spin-us must be non-negative, got {args.spin_us}")
    tmp = tempfile.mkdtemp(prefix="bench-ipc-")  # 0700: the pyzmq sockets live here
    wall0, busy0, own0 = time.monotonic(), busy_jiffies(), own_cpu_s()
    try:
        report = broadcast_suite(args, counts, tmp) if counts else main_suite(args, transports, tmp)
    finally:
        for child in CHILDREN:  # after a failure, no child may outlive us
            if child.poll() is None:
                child.kill()
            child.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - wall0
    # /proc/stat counts in ticks, rusage exactly: on a quiet machine the difference can come
    # out slightly negative, which means none.
    other = max(0.0, (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (own_cpu_s() - own0))
    report.update(wall_s=wall, other_processes_cpu_s=other, other_processes_cores=other / wall)
    print(f"wall {wall:.1f} s; other processes took {other:.1f} CPU-s meanwhile "
          f"({other / wall:.2f} of {os.cpu_count()} cores): timings are only as quiet as that")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
