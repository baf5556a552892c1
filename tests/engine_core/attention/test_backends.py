"""The attention backends through their one interface: selection, the shared step layout,
native attention against dense attention, and the cuda backend (the kernels' torch
references on a CPU) against the native one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_core.attention import choose_backend, make_backend
from engine_core.attention import torch_paged as attention
from engine_core.attention.common import step_layout, token_positions
from engine_core.attention.cuda import CudaBackend, unsupported_by_kernels
from engine_core.attention.torch_paged import AttentionMetadata, NativeBackend, paged_attention
from engine_core.worker.staging import PinnedStaging

BLOCK = 16
CPU = torch.device("cpu")


def test_the_backend_is_native_on_a_cpu_unless_cuda_is_asked_for():
    assert choose_backend(None, CPU, torch.float32, 64, 576, 1536) == "native"
    assert choose_backend("cuda", CPU, torch.float32, 72, 576, 1536) == "cuda"  # references
    assert choose_backend("native", CPU, torch.bfloat16, 64, 576, 1536) == "native"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        choose_backend("torch", CPU, torch.float32, 64, 576, 1536)
    native, cuda = (
        make_backend("native", CPU, torch.float32, 64),
        make_backend("cuda", CPU, torch.float32, 64),
    )
    assert isinstance(native, NativeBackend) and native.ops.name == "native"
    assert isinstance(cuda, CudaBackend) and cuda.ops.name == "cuda"


def test_step_layout_splits_rows_and_maps_slots_once_for_both_backends():
    query_lens, computed = np.array([1, 1, 3, 4]), np.array([4, 16, 0, 16])
    tables = np.array([[7, 0], [2, 9], [4, 0], [5, 6]])
    layout = step_layout(query_lens, computed, tables, BLOCK)
    assert layout.num_decode == 2 and layout.context_lens.tolist() == [5, 17, 3, 20]
    assert layout.positions.tolist() == token_positions(query_lens, computed).tolist()
    assert layout.slot_mapping.tolist() == [7 * 16 + 4, 9 * 16, 64, 65, 66, 96, 97, 98, 99]
    native = NativeBackend().prepare(np.arange(9), layout, np.array([8]))
    cuda = CudaBackend(PinnedStaging(256, "cpu")).prepare(np.arange(9), layout, np.array([8]))
    for step in (native, cuda):
        assert step.meta.slot_mapping.tolist() == layout.slot_mapping.tolist()
        assert step.meta.positions.tolist() == layout.positions.tolist()
        assert step.input_ids.tolist() == list(range(9)) and step.logits_indices.tolist() == [8]


def naive_attention(q, k, v, num_computed: int) -> torch.Tensor:
    """q [n, H, D] at positions num_computed.., k/v [num_computed + n, KVH, D]: causal, dense."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    keys, queries = torch.arange(k.shape[0]), torch.arange(q.shape[0]) + num_computed
    scores = scores.masked_fill(keys[None, None, :] > queries[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)


def test_paged_attention_matches_dense_attention_for_mixed_rows():
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, num_blocks = 6, 2, 8, 200
    # 11 decode rows of mixed lengths (two decode groups), two short rows over a cached
    # prefix (a verify row of 1 + 5 drafts, a short chunk: each attended as single-query
    # rows), a long prefill over a cached prefix, a short one over a context too long for
    # per-token attention (SHORT_ROW_MAX_PAIRS), and a fresh prefill: (num_computed, query_len)
    specs = [(int(c), 1) for c in torch.randint(0, 90, (11,), generator=gen)]
    specs += [(50, 6), (37, 20), (33, 40), (600, 30), (0, 25)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    tables, qs, ks, vs, dense_k, dense_v = [], [], [], [], [], []
    for computed, n in specs:
        total = computed + n
        table = [perm.pop() for _ in range(-(-total // BLOCK))]
        full_k = torch.randn(total, kv_heads, dim, generator=gen)
        full_v = torch.randn(total, kv_heads, dim, generator=gen)
        for pos in range(computed):  # the cached prefix is already in the pools
            slot = (table[pos // BLOCK], pos % BLOCK)
            k_cache[slot], v_cache[slot] = full_k[pos], full_v[pos]
        tables.append(table)
        qs.append(torch.randn(n, heads, dim, generator=gen))
        ks.append(full_k[computed:])
        vs.append(full_v[computed:])
        dense_k.append(full_k)
        dense_v.append(full_v)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata.build(
        np.array([n for _, n in specs]),
        np.array([c for c, _ in specs]),
        np.array([t + [0] * (width - len(t)) for t in tables]),
        BLOCK,
    )
    assert len(meta.decode_groups) == 2 + 2 and len(meta.prefills) == 3
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta)
    expected = torch.cat(
        [
            naive_attention(q, k, v, c)
            for q, k, v, (c, _) in zip(qs, dense_k, dense_v, specs, strict=True)
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Every new token's K/V landed in its slot.
    for (computed, n), table, k in zip(specs, tables, dense_k, strict=True):
        last = computed + n - 1
        assert torch.equal(k_cache[table[last // BLOCK], last % BLOCK], k[last])


def test_attention_metadata_rejects_decode_rows_after_prefill_rows():
    with pytest.raises(AssertionError, match="single-query rows must come before"):
        AttentionMetadata.build(np.array([4, 1]), np.array([0, 3]), np.zeros((2, 1), int), BLOCK)


def test_kernel_metadata_splits_decode_and_prefill_rows():
    # Rows: two decodes (contexts 5 and 17), a fresh 3-token prefill, a 4-token chunk after 16.
    query_lens, computed = np.array([1, 1, 3, 4]), np.array([4, 16, 0, 16])
    tables = np.array([[7, 0], [2, 9], [4, 0], [5, 6]])
    step = CudaBackend(PinnedStaging(256, "cpu")).prepare(
        np.arange(9) + 100, step_layout(query_lens, computed, tables, BLOCK), np.array([0, 1, 4, 8])
    )
    m = step.meta
    assert step.input_ids.tolist() == list(range(100, 109))
    assert m.positions.tolist() == [4, 16, 0, 1, 2, 16, 17, 18, 19]
    assert m.slot_mapping.tolist() == [7 * 16 + 4, 9 * 16, 64, 65, 66, 96, 97, 98, 99]
    assert m.num_decode_tokens == 2 and m.max_decode_context_len == 17
    assert m.decode_block_tables.tolist() == [[7, 0], [2, 9]]
    assert m.decode_context_lens.tolist() == [5, 17]
    assert m.prefill_block_tables.tolist() == [[4, 0], [5, 6]]
    assert m.prefill_context_lens.tolist() == [3, 20]
    assert m.prefill_cu_seqlens_q.tolist() == [0, 3, 7] and m.max_prefill_query_len == 4
    assert step.logits_indices.tolist() == [0, 1, 4, 8]
    with pytest.raises(AssertionError, match="single-query rows must come before"):
        step_layout(np.array([3, 1]), np.array([0, 0]), tables[:2], BLOCK)


def test_kernel_attention_matches_the_cpu_attention_on_a_mixed_step():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd = 6, 2, 16
    query_lens = np.array([1, 1, 1, 9, 30, 5])
    computed = np.array([4, 40, 17, 0, 21, 0])
    blocks = -(-(query_lens + computed) // BLOCK)
    perm = np.random.default_rng(0).permutation(40)
    starts = np.cumsum(blocks) - blocks
    tables = np.zeros((6, blocks.max()), dtype=np.int64)
    for i in range(6):
        tables[i, : blocks[i]] = perm[starts[i] : starts[i] + blocks[i]]
    caches = torch.randn(2, 40, BLOCK, kv_heads, hd, generator=gen)  # cached prefixes: random
    t = int(query_lens.sum())
    q, k, v = (torch.randn(t, h, hd, generator=gen) for h in (heads, kv_heads, kv_heads))
    cpu_caches, kernel_caches = caches.clone(), caches.clone()
    meta = AttentionMetadata.build(query_lens, computed, tables, BLOCK)
    expected = attention.paged_attention(q, k, v, cpu_caches[0], cpu_caches[1], meta)
    backend = CudaBackend(PinnedStaging(64, "cpu"))
    layout = step_layout(query_lens, computed, tables, BLOCK)
    step = backend.prepare(np.zeros(t, dtype=np.int64), layout, np.zeros(0, dtype=np.int64))
    got = backend(q, k, v, kernel_caches, step.meta)
    assert torch.equal(kernel_caches, cpu_caches)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kernels_support_half_precision_and_vectorizable_shapes():
    assert unsupported_by_kernels(torch.bfloat16, 64, 576, 1536) is None  # SmolLM2-135M
    assert unsupported_by_kernels(torch.float16, 128, 4096, 14336) is None  # Llama-3-8B
    assert "not torch.float32" in unsupported_by_kernels(torch.float32, 64, 576, 1536)
    assert "head_dim 72" in unsupported_by_kernels(torch.bfloat16, 72, 576, 1536)
    assert "MLP size 1532" in unsupported_by_kernels(torch.bfloat16, 64, 576, 1532)
