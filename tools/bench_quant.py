"""Times kernels_cpu's quantized GEMM against torch's fp32/bf16 linear on the model's shapes.

Per call (one layer's shapes) and whole model (its 30 layers' linears + the LM head), at
several row counts, as the default GGUF holds them (Q4_1 layers, Q8_0 LM head). `deq+sgemm`
is what QuantizedLinear runs past GEMM_MAX_ROWS (each weight dequantized into the scratch
buffer, then torch's matmul): the crossover with `quant` is where that threshold belongs.
Also the ctypes call overhead (a 1x32 @ 32x32 product), and on a CPU with AVX512-BF16 the
LM head's bf16 product packing its Q8_0 blocks per call against its kept Q8 panels
(QuantizedLinear.keep_q8_panels). `--quick` runs one short repeat.
Times are CPU seconds per thread (see _time): run it alone for wall-clock figures.

    python tools/bench_quant.py [--rows 1,8,32,256,512] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from engine_core.models.quant_layers import QuantizedLinear
from kernels_cpu import ops

# SmolLM2-135M: (out, in) of qkv, o, gate_up, down; 30 layers; LM head 49152 x 576
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def _random_blocks(wtype: int, n: int, k: int) -> torch.Tensor:
    raw = torch.randint(0, 256, (n, k // 32, ops.BLOCK_BYTES[wtype]), dtype=torch.uint8)
    raw[:, :, 0], raw[:, :, 1] = 0x66, 0x22  # fp16 scale ~0.0125, finite
    if wtype == ops.Q4_1:
        raw[:, :, 2], raw[:, :, 3] = 0x66, 0xA2  # fp16 min ~ -0.0125
    return raw.reshape(-1).contiguous()


def _time(fn, repeat: int) -> float:
    """Best of `repeat` runs, in seconds of this process's CPU time per thread used.

    CPU time rather than wall time: on a shared machine a run waits for a core, and that
    wait is not the kernel's. With one thread it is the kernel's own time.
    """
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, (time.process_time() - t) / torch.get_num_threads())
    return best


def _wall_medians(fns: list, repeat: int) -> list[float]:
    """Median wall-clock seconds of each fn, the fns run in turn `repeat` times (so a busy
    spell of the machine falls on all of them). For products whose weights stream from
    memory, where the best CPU time of a repeat shows a weight left in the caches."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def _lm_head_line(head: tuple, x: torch.Tensor, repeat: int) -> str:
    """The LM head's bf16 product packing its Q8_0 blocks per call against its Q8 panels."""
    w, _, n, k = head
    panels = ops.pack_q8_panels(w, n, k)
    per_call, kept = _wall_medians(
        [
            lambda: ops.gemm_bf16(x, w, ops.Q8_0, n, k),
            lambda: ops.gemm_bf16_q8_panels(x, panels, n, k),
        ],
        repeat,
    )
    return (
        f"       LM head in bf16 (wall clock, medians): packed per call {per_call * 1e3:.2f} ms, "
        f"Q8 panels {kept * 1e3:.2f} ms ({per_call / kept:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else 5
    print(f"kernels_cpu: {ops.simd_level()}, threads {torch.get_num_threads()}")
    x1 = torch.randn(1, 32)
    w1 = _random_blocks(ops.Q8_0, 32, 32)
    n_calls = 200 if args.quick else 2000
    t = _time(lambda: [ops.gemm(x1, w1, ops.Q8_0, 32, 32) for _ in range(n_calls)], 1)
    print(f"call overhead (1x32 @ 32x32): {t / n_calls * 1e6:.1f} us")
    shapes = [(n, k, ops.Q4_1) for n, k in LAYER] * LAYERS + [(VOCAB, HIDDEN, ops.Q8_0)]
    quant = [(_random_blocks(t, n, k), t, n, k) for n, k, t in shapes]
    layers = [QuantizedLinear(w, t, k, n) for w, t, n, k in quant]
    fp32 = [ops.dequantize(w, t, n, k) for w, t, n, k in quant]
    bf16 = [w.bfloat16() for w in fp32]
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        runs = {
            "quant": lambda xs=xs: [ops.gemm(xs[k], w, t, n, k) for w, t, n, k in quant],
            "quant-int8act": lambda xs=xs: [
                ops.gemm(xs[k], w, t, n, k, int8_activations=True) for w, t, n, k in quant
            ],
            "deq+sgemm": lambda xs=xs: [q._dequantized_matmul(xs[q.in_features]) for q in layers],
            "fp32": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in fp32],
            "bf16": lambda xs=xs: [F.linear(xs[w.shape[1]].bfloat16(), w) for w in bf16],
        }
        times = {name: _time(fn, repeat) for name, fn in runs.items()}
        layer = {
            "quant": _time(
                lambda xs=xs: [ops.gemm(xs[k], w, t, n, k) for w, t, n, k in quant[:4]], repeat
            ),
            "fp32": _time(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in fp32[:4]], repeat),
        }
        print(
            f"M={m:3d}  whole model: quant {times['quant'] * 1e3:7.2f} ms  "
            f"int8-act {times['quant-int8act'] * 1e3:7.2f} ms  "
            f"deq+sgemm {times['deq+sgemm'] * 1e3:7.2f} ms  fp32 "
            f"{times['fp32'] * 1e3:7.2f} ms  bf16 {times['bf16'] * 1e3:7.2f} ms  "
            f"(fp32/quant {times['fp32'] / times['quant']:.2f}x)  one layer: quant "
            f"{layer['quant'] * 1e3:.3f} ms fp32 {layer['fp32'] * 1e3:.3f} ms"
        )
        if ops.has_bf16_gemm() and not ops.bf16_amx():
            print(_lm_head_line(quant[-1], xs[HIDDEN], 3 if args.quick else 15))


if __name__ == "__main__":
    main()
