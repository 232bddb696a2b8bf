"""Attention over TVM's paged KV cache, for CPUs: decode, the prefill chunk's own keys, earlier pages.

TVM 0.27's CPU attention kernels (relax/frontend/nn/llm/_decode_kernels.py, _prefill_kernels.py)
walk one key at a time with scalar loops: a 64-long dot product is one dependency chain, and the
online softmax rescales the output after every key; prefill computes every masked key too and runs
its sequences one after another on one thread. On SmolLM2 (9 query / 3 KV heads, head dim 64)
decode attention took ~95 us per layer at 200 tokens of context, a fifth of a decode step. The
kernels here compute the same thing 16 keys at a time: the dot products in 16 independent lanes
reduced as a tree, one softmax rescale per 16 keys, each key read once for all the query heads of
its group, only the keys the causal mask lets a query see, and the work spread over the thread
pool ((sequence, KV head) pairs for decode, (query row, KV head) pairs for prefill).

Prefill against the pages a sequence already holds (a prompt continued after a prefix-cache hit,
a long prompt's later chunks) is the same walk, page by page. Caches in fp16 (`--kv-cache fp16`)
keep fp16 pages, queries and outputs; the kernels widen them as they read and compute in fp32.

`replace_attention_kernels` swaps them in at build time for the stock kernels, under the stock
kernels' names and with their calling conventions. The sliding-window variants and models that ask
the cache to apply RoPE inside attention keep TVM's kernels (edgejit's models apply RoPE themselves).
"""

from __future__ import annotations

import math
import operator

from edge.kernels.tir_exprs import prefetch, tree

STOCK_NAMES = ("batch_decode_paged_kv_cpu", "tir_attention_decode_cpu")  # its name in the module
STOCK_RAGGED_NAMES = ("batch_prefill_ragged_kv", "tir_attention_prefill_ragged_cpu")
STOCK_PAGED_PREFILL_NAMES = ("batch_prefill_paged_kv_cpu", "tir_attention_prefill_cpu")  # not the sliding-window one
LANES = 16  # partial sums of a dot product; LLVM splits them into the target's vectors
# Keys and values are read a chunk (a KV page) at a time from wherever the page pool put them: in a
# decode step the weights streamed since the last layer have pushed them out of cache, and the
# hardware prefetchers do not follow a page table. The chunk this many ahead is prefetched while one
# is computed, its row r while row r of this one is (SmolLM2 Q4_1, one Zen 5 core, a 128-token reply
# after 200 prompt tokens, perf samples: decode attention 0.296-0.300 of the batch-1 dense kernels'
# without, 0.248-0.253 with). Spread, not all 64 lines at the chunk's start: a burst of prefetches
# fills the core's queue of outstanding misses and stalls it (SmolLM2's shapes, 30 layers' pages out
# of cache, one core, per layer: 264 tokens 35 -> 27 us, 1,024 tokens 115 -> 74-78 us; 2 chunks ahead: the same).
PREFETCH_AHEAD = 1
DTYPES = ("float32", "float16")  # of the cache (and of q and the output: TVM's cache wants one dtype); math in fp32


def replace_attention_kernels(mod):
    """Replace the stock CPU decode attention (`decode_paged_kv`), ragged prefill attention
    (`prefill_ragged`) and paged prefill attention (`prefill_paged_kv`) PrimFuncs in `mod`, where
    their shapes are ones these kernels take."""
    from tvm import tirx

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if gv.name_hint in STOCK_NAMES and len(func.params) == 13:
            shapes = _paged_shapes(func.params[0], func.params[1])
            if shapes is not None:
                mod[gv] = decode_paged_kv(*shapes)
        elif gv.name_hint in STOCK_RAGGED_NAMES and len(func.params) == 14:
            q, k, v = func.params[0], func.params[2], func.params[3]
            dims = [[int(x) if hasattr(x, "value") else None for x in b.shape[1:]] for b in (q, k, v)]
            (h_qo, d), (h_kv, d_k), (h_v, d_v) = dims
            if None in (h_qo, d, h_kv) or d != d_k or d != d_v or h_v != h_kv or h_qo % h_kv or d % LANES:
                continue
            dtype = str(q.dtype)
            if dtype not in DTYPES or any(str(b.dtype) != dtype for b in (k, v)):
                continue
            mod[gv] = prefill_ragged(h_kv, h_qo, d, dtype)
        # (paged prefill: a 1-D length info, the last page's length; 2-D is the sliding-window layout)
        elif gv.name_hint in STOCK_PAGED_PREFILL_NAMES and len(func.params) == 15 and len(func.params[5].shape) == 1:
            shapes = _paged_shapes(func.params[0], func.params[2])
            if shapes is not None:
                mod[gv] = prefill_paged_kv(*shapes)
    return mod


def _paged_shapes(q, pages):
    """(KV heads, query heads, head dim, page size, dtype) from a stock paged kernel's query and
    page buffers, or None where these kernels do not take them."""
    try:
        _, h_qo, d = (int(x) if hasattr(x, "value") else None for x in q.shape)
        _, two, h_kv, page_size, d2 = (int(x) if hasattr(x, "value") else None for x in pages.shape)
    except ValueError:
        return None
    dtype = str(q.dtype)
    if None in (h_qo, d, h_kv, page_size) or two != 2 or d != d2 or dtype != str(pages.dtype):
        return None
    if d % LANES or h_qo % h_kv or dtype not in DTYPES or page_size != 16:
        return None
    return h_kv, h_qo, d, page_size, dtype


def _exp2(x):
    """2**x as vector arithmetic (T.exp2 is a scalar libm call per lane, ~40% of the kernel at long
    contexts): 2**round(x) from the exponent bits times Cephes' exp2f polynomial for the fraction in
    [-0.5, 0.5] (relative error ~2e-7). x is clamped to [-126, 126]: the softmax only feeds it
    differences to the running max, <= 0, where anything below -126 is 0 to fp32 precision."""
    from tvm.script import tirx as T

    x = T.max(T.min(x, T.float32(126)), T.float32(-126))
    n = T.round(x)
    f = x - n
    p = T.float32(1.535336188319500e-4)
    for c in (1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1):
        p = p * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23)))
    return (p * f + T.float32(1)) * scale


def _row_max(buf, g, n: int):
    from tvm.script import tirx as T

    return tree(T.max, (buf[g, r] for r in range(n)))


def _sum(buf, n: int):
    return tree(operator.add, (buf[r] for r in range(n)))


def _attention_task(G: int, P: int, d: int, dtype: str):
    """The TVMScript macro every kernel runs per task (the G query heads of one KV head, one query
    row): `one_task(query, output, lse, first, hk, sm_scale, n_chunks, base_of, rows_of, key, value)`
    loads the scaled queries of row `first`, walks `n_chunks` chunks of keys (chunk c: `rows_of(c)`
    <= P keys at `base = base_of(c)`, read through `key(base, r, j)` / `value(base, r, j)`) with an
    online softmax, and writes the output and the log2-sum-exp at `[first, hk * G + g, ...]`."""
    from tvm.script import tirx as T

    L = LANES
    C = d // L
    log2e = math.log2(math.exp(1))
    per_line = 64 // (2 if dtype == "float16" else 4)  # elements per cache line
    lines = (d + per_line - 1) // per_line

    @T.macro
    def start(q_s, o_s, m_s, l_s, query, first, hk, sm_scale):
        for g in range(G):
            for j in T.vectorized(d):
                q_s[g, j] = T.Cast("float32", query[first, hk * G + g, j]) * (sm_scale * T.float32(log2e))
                o_s[g, j] = T.float32(0)
            m_s[g] = T.float32(-5e4)
            l_s[g] = T.float32(1)

    @T.macro
    def attend(q_s, o_s, m_s, l_s, s_s, p_s, acc, half, quarter, rows, key, value, ahead, key_ahead, value_ahead):
        for g in range(G):
            for r in T.vectorized(P):
                s_s[g, r] = T.float32(-1e30)
            for r in range(rows):
                if g == 0 and ahead >= 0:
                    for line in T.unroll(lines):
                        T.evaluate(prefetch(key_ahead(ahead, r, line * per_line)))
                        T.evaluate(prefetch(value_ahead(ahead, r, line * per_line)))
                for l in T.vectorized(L):
                    acc[l] = q_s[g, l] * T.Cast("float32", key(r, l))
                for c in range(1, C):
                    for l in T.vectorized(L):
                        acc[l] = acc[l] + q_s[g, c * L + l] * T.Cast("float32", key(r, c * L + l))
                for l in T.vectorized(L // 2):
                    half[l] = acc[l] + acc[l + L // 2]
                for l in T.vectorized(L // 4):
                    quarter[l] = half[l] + half[l + L // 4]
                s_s[g, r] = _sum(quarter, L // 4)
            new_m: T.let[T.float32] = T.max(m_s[g], _row_max(s_s, g, P))
            rescale: T.let[T.float32] = _exp2(m_s[g] - new_m)
            for r in T.vectorized(P):
                p_s[r] = _exp2(s_s[g, r] - new_m)
            l_s[g] = l_s[g] * rescale + _sum(p_s, P)
            for j in T.vectorized(d):
                o_s[g, j] = o_s[g, j] * rescale
            for r in range(rows):
                for j in T.vectorized(d):
                    o_s[g, j] = o_s[g, j] + p_s[r] * T.Cast("float32", value(r, j))
            m_s[g] = new_m

    @T.macro
    def finish(o_s, m_s, l_s, output, lse, first, hk):
        for g in range(G):
            for j in T.vectorized(d):
                output[first, hk * G + g, j] = T.Cast(dtype, o_s[g, j] / l_s[g])
            lse[first, hk * G + g] = m_s[g] + T.log2(l_s[g])

    @T.macro
    def one_task(query, output, lse, first, hk, sm_scale, n_chunks, base_of, rows_of, key, value):
        q_s = T.sblock_alloc_buffer((G, d), "float32")
        o_s = T.sblock_alloc_buffer((G, d), "float32")
        m_s = T.sblock_alloc_buffer((G,), "float32")
        l_s = T.sblock_alloc_buffer((G,), "float32")
        s_s = T.sblock_alloc_buffer((G, P), "float32")
        p_s = T.sblock_alloc_buffer((P,), "float32")
        acc = T.sblock_alloc_buffer((LANES,), "float32")
        half = T.sblock_alloc_buffer((LANES // 2,), "float32")
        quarter = T.sblock_alloc_buffer((LANES // 4,), "float32")
        start(q_s, o_s, m_s, l_s, query, first, hk, sm_scale)
        for chunk in range(n_chunks):
            base: T.let[T.int32] = base_of(chunk)
            rows: T.let[T.int32] = rows_of(chunk)
            ahead: T.let[T.int32] = T.if_then_else(  # -1: no chunk that far ahead
                chunk + PREFETCH_AHEAD < n_chunks, base_of(T.min(chunk + PREFETCH_AHEAD, n_chunks - 1)), -1)
            attend(q_s, o_s, m_s, l_s, s_s, p_s, acc, half, quarter, rows,
                   lambda r, j: key(base, r, j), lambda r, j: value(base, r, j), ahead, key, value)
        finish(o_s, m_s, l_s, output, lse, first, hk)

    @T.macro
    def find_sequence(seq, batch_size, q_indptr, row):
        """seq[0] = the sequence whose queries hold ragged row `row`."""
        seq[0] = 0
        for b in range(batch_size):
            if q_indptr[b] <= row:
                seq[0] = b

    return one_task, find_sequence


def decode_paged_kv(h_kv: int, h_qo: int, d: int, page_size: int, dtype: str = "float32"):
    """The PrimFunc: one query token per sequence against its pages; the stock kernel's signature,
    outputs (attention output and log2-sum-exp) and numerics (scores scaled by log2 e, exp2).
    `dtype`: of the pages, the queries and the output (fp16 ones are widened as they are read)."""
    from tvm.script import tirx as T

    if page_size != 16:
        raise ValueError(f"decode attention is written for KV pages of 16 tokens, not {page_size}")
    G = h_qo // h_kv
    P = page_size
    one_task, _ = _attention_task(G, P, d, dtype)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, h_qo, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, P, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_qo), "float32")
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)

        T.Assert(rotary_mode == 0, "edgejit's decode attention takes keys already rotated (RoPE applied by the model)")
        for bh in T.parallel(B * h_kv):
            with T.sblock("attn"):
                vbh = T.axis.spatial(B * h_kv, bh)
                T.reads()
                T.writes()
                b: T.let[T.int32] = vbh // h_kv
                hk: T.let[T.int32] = vbh % h_kv
                begin: T.let[T.int32] = page_table_indptr[b]
                n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                one_task(Q, output, lse, b, hk, sm_scale, n_pages, lambda p: page_table_values[begin + p],
                     lambda p: T.if_then_else(p == n_pages - 1, last_page_len[b], P),
                     lambda page, r, j: pages[page, 0, hk, r, j], lambda page, r, j: pages[page, 1, hk, r, j])

    return batch_decode_paged_kv


def prefill_ragged(h_kv: int, h_qo: int, d: int, dtype: str = "float32"):
    """The PrimFunc: a prefill chunk's queries against the chunk's own keys (causal or not), with
    the stock `batch_prefill_ragged_kv` CPU kernel's signature and numerics. Every (query row, KV
    head) pair is a task for the thread pool; each walks only the keys its mask lets it see, 16 at
    a time, like `decode_paged_kv`."""
    from tvm.script import tirx as T

    G = h_qo // h_kv
    P = 16  # keys per softmax update
    one_task, find_sequence = _attention_task(G, P, d, dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()

        q = T.match_buffer(var_q, (qo_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_qo, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_qo), "float32")

        T.Assert(rotary_mode == 0, "edgejit's prefill attention takes keys already rotated (RoPE applied by the model)")
        for task in T.parallel(qo_len * h_kv):
            with T.sblock("attn"):
                vtask = T.axis.spatial(qo_len * h_kv, task)
                T.reads()
                T.writes()
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = vtask // h_kv
                hk: T.let[T.int32] = vtask % h_kv
                find_sequence(seq, batch_size, q_indptr, row)
                b_: T.let[T.int32] = seq[0]
                kv_begin: T.let[T.int32] = kv_indptr[b_]
                kv_n: T.let[T.int32] = kv_indptr[b_ + 1] - kv_begin
                q_n: T.let[T.int32] = q_indptr[b_ + 1] - q_indptr[b_]
                n_keys: T.let[T.int32] = T.max(T.min(T.if_then_else(
                    causal > 0, kv_n - q_n + (row - q_indptr[b_]) + 1, kv_n), kv_n), 0)
                one_task(q, output, lse, row, hk, sm_scale, (n_keys + P - 1) // P, lambda c: kv_begin + c * P,
                     lambda c: T.min(n_keys - c * P, P),
                     lambda base, r, j: k[base + r, hk, j], lambda base, r, j: v[base + r, hk, j])

    return batch_prefill_ragged_kv


def prefill_paged_kv(h_kv: int, h_qo: int, d: int, page_size: int, dtype: str = "float32"):
    """The PrimFunc: a prefill chunk's queries against the pages a sequence already holds (a prompt
    continued after the prefix cache's match, the chunks after a long prompt's first), with the
    stock `batch_prefill_paged_kv_cpu` kernel's signature and numerics (TVM 0.27's walks one key at a
    time on one thread: 500 tokens against 500 cached took ~4 s of SmolLM2's prefill). The cache
    merges the result with the chunk's own attention (`prefill_ragged`). Tasks and key walk as in
    `prefill_ragged`, the keys read page by page as in `decode_paged_kv`."""
    from tvm.script import tirx as T

    if page_size != 16:
        raise ValueError(f"prefill attention is written for KV pages of 16 tokens, not {page_size}")
    G = h_qo // h_kv
    P = page_size
    one_task, find_sequence = _attention_task(G, P, d, dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, P, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_qo, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_qo), "float32")

        T.Assert(rotary_mode == 0, "edgejit's prefill attention takes keys already rotated (RoPE applied by the model)")
        for task in T.parallel(total_len * h_kv):
            with T.sblock("attn"):
                vtask = T.axis.spatial(total_len * h_kv, task)
                T.reads()
                T.writes()
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = vtask // h_kv
                hk: T.let[T.int32] = vtask % h_kv
                find_sequence(seq, batch_size, q_indptr, row)
                b_: T.let[T.int32] = seq[0]
                begin: T.let[T.int32] = page_indptr[b_]
                n_pages: T.let[T.int32] = page_indptr[b_ + 1] - begin
                kv_n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * P + last_page_len[b_], 0)
                q_n: T.let[T.int32] = q_indptr[b_ + 1] - q_indptr[b_]
                n_keys: T.let[T.int32] = T.max(T.min(T.if_then_else(
                    causal > 0, kv_n - q_n + (row - q_indptr[b_]) + 1, kv_n), kv_n), 0)
                one_task(q, output, lse, row, hk, sm_scale, (n_keys + P - 1) // P, lambda p: page_values[begin + p],
                     lambda p: T.min(n_keys - p * P, P),
                     lambda page, r, j: pages[page, 0, hk, r, j], lambda page, r, j: pages[page, 1, hk, r, j])

    return batch_prefill_paged_kv_cpu
