"""A tensor-parallel worker: one rank of the model, driven by the executor's step broadcast.

`python -m engine_core.worker --handshake ADDR --rank R --parent-pid PID`, started by
MultiprocExecutor in the EngineCore process. It fetches its WorkerHandshake over ZMQ, joins
the process group, loads its shard into a ModelRunner, replies, then loops: dequeue a
WorkerInput from the broadcast MessageQueue, run it; rank 0 alone sends results back on its
own MessageQueue. Everything it receives is msgspec; nothing is unpickled.

It dies with the EngineCore: PDEATHSIG (SIGKILL: a rank blocked in a collective could not run
a Python handler) and the broadcast queue's PeerDiedError. A failing step is fatal: the
collectives of the other ranks cannot go on without this one, so it reports and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

import msgspec
import torch

from engine_core.config import EngineConfig
from engine_core.distributed import destroy_tensor_parallel, init_tensor_parallel, worker_device
from engine_core.process import connect_handshake, reply_startup_error, start_child_process
from engine_core.protocol import (
    WorkerExecute,
    WorkerHandshake,
    WorkerHandshakeReply,
    WorkerInput,
    WorkerOutput,
    WorkerReady,
    WorkerSample,
    WorkerShutdown,
    WorkerWarmup,
)
from engine_core.worker.model_runner import ModelRunner
from ipc import MessageQueue, MessageQueueHandle, PeerDiedError

logger = logging.getLogger("ringserve.worker")

_HANDSHAKE_TIMEOUT_S = 60.0
_RESULT_TIMEOUT_S = 60.0  # how long rank 0 waits for the executor to take a result


def num_threads(config: EngineConfig) -> int:
    """torch threads per worker: config.num_threads, else this machine's cores shared by N."""
    if config.num_threads is not None:
        return config.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // config.tensor_parallel_size)


def run_worker(handshake_addr: str, rank: int, parent_pid: int) -> int:
    """Process entry: handshake, start-up, then the step loop. Returns the exit code."""
    # SIGKILL: a rank blocked in a collective could not run a Python handler.
    start_child_process(f"worker {rank}", signal.SIGKILL)
    if os.getppid() != parent_pid:
        return 1  # the EngineCore died before PDEATHSIG was armed
    ctx, sock = connect_handshake(handshake_addr)
    broadcast = result_q = None
    try:
        if not sock.poll(_HANDSHAKE_TIMEOUT_S * 1000):
            logger.error("no handshake within %.0f s", _HANDSHAKE_TIMEOUT_S)
            return 1
        hello = msgspec.msgpack.decode(sock.recv(), type=WorkerHandshake)
        if hello.rank != rank:
            raise ValueError(f"handshake for rank {hello.rank} reached rank {rank}.")
        try:
            runner, broadcast, result_q = _start(hello)
        except Exception as e:
            reply_startup_error(sock, WorkerHandshakeReply, e)
            sock.close()  # lingers until the reply is out
            return 1
        sock.send(msgspec.msgpack.encode(_ready_reply(runner, result_q)))
        sock.close()
        if result_q is not None:
            result_q.wait_for_readers(timeout=_HANDSHAKE_TIMEOUT_S)
        _step_loop(runner, broadcast, result_q)
        destroy_tensor_parallel()  # only on a clean shutdown: a broken group may not answer
        return 0
    except PeerDiedError as e:
        logger.info("the engine core is gone (%s): exiting", e)
        return 0
    except Exception:
        logger.error("worker failed: %s", traceback.format_exc())
        return 1
    finally:
        for q in (result_q, broadcast):
            if q is not None:
                q.close()
        ctx.destroy(linger=0)


def _start(hello: WorkerHandshake) -> tuple[ModelRunner, MessageQueue, MessageQueue | None]:
    """Join the group and load this rank's shard: (runner, broadcast reader, result writer)."""
    config = msgspec.json.decode(hello.config_json, type=EngineConfig)
    torch.set_num_threads(num_threads(config))
    device = worker_device(config.device, hello.rank, config.tensor_parallel_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    handle = msgspec.msgpack.decode(hello.broadcast_queue, type=MessageQueueHandle)
    broadcast = MessageQueue.attach(handle, hello.rank, msg_type=WorkerInput)
    try:
        t0 = time.perf_counter()
        init_tensor_parallel(
            hello.rank, config.tensor_parallel_size, hello.dist_init_method, device
        )
        runner = ModelRunner(config, tp_rank=hello.rank, device=device)
        logger.info(
            "rank %d of %d ready in %.2f s: %.1f MiB of weights, %d KV blocks",
            hello.rank,
            config.tensor_parallel_size,
            time.perf_counter() - t0,
            runner.model.weight_bytes() / 2**20,
            runner.num_blocks,
        )
        result_q = None
        if hello.rank == 0:
            result_q = MessageQueue(n_reader=1, max_chunk_bytes=1 << 20, max_chunks=8)
    except BaseException:
        broadcast.close()
        raise
    return runner, broadcast, result_q


def _ready_reply(runner: ModelRunner, result_q: MessageQueue | None) -> WorkerHandshakeReply:
    return WorkerHandshakeReply(
        ready=WorkerReady(
            num_blocks=runner.num_blocks,
            max_model_len=runner.max_model_len,
            model_config=runner.worker_model_config(),
            weight_bytes=runner.model.weight_bytes(),
            kv_cache_bytes=runner.kv_cache.numel() * runner.kv_cache.element_size(),
        ),
        result_queue=b"" if result_q is None else msgspec.msgpack.encode(result_q.export_handle()),
    )


def _step_loop(runner: ModelRunner, broadcast: MessageQueue, result_q: MessageQueue | None) -> None:
    """Run broadcast messages until WorkerShutdown; rank 0 (result_q set) answers each one."""
    while True:
        msg = broadcast.dequeue()  # blocks; PeerDiedError once the EngineCore is gone
        if isinstance(msg, WorkerShutdown):
            return
        try:
            if isinstance(msg, WorkerExecute):
                out = WorkerOutput(runner_output=runner.execute_model(msg.scheduler_output))
                if msg.scheduler_output.structured_req_ids:
                    continue  # rank 0 answers the step's WorkerSample instead
            elif isinstance(msg, WorkerSample):
                out = WorkerOutput(runner_output=runner.sample_tokens(msg.grammar_output))
            elif isinstance(msg, WorkerWarmup):
                runner.warmup()
                out = WorkerOutput()
            else:
                raise TypeError(f"unexpected broadcast message {type(msg).__name__}")
        except Exception as e:
            if result_q is not None:
                error = WorkerOutput(error=f"{type(e).__name__}: {e}")
                result_q.enqueue(error, timeout=_RESULT_TIMEOUT_S)
            raise
        if result_q is not None:
            result_q.enqueue(out, timeout=_RESULT_TIMEOUT_S)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="ringserve tensor-parallel worker (started by the EngineCore)"
    )
    parser.add_argument("--handshake", required=True, help="ZMQ address of the executor")
    parser.add_argument("--rank", required=True, type=int)
    parser.add_argument("--parent-pid", required=True, type=int)
    args = parser.parse_args()
    return run_worker(args.handshake, args.rank, args.parent_pid)


if __name__ == "__main__":
    code = main()
    # Everything is closed by now; skip the interpreter's teardown (torch's takes 0.5-1.5 s
    # here), so that the engine shuts down promptly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
