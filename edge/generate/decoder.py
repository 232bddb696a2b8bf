"""A compiled decoder with its KV cache: prefill chunks and batched decode steps over TVM's paged
KV cache, which this object owns (one per engine). Logits come back as fp32 numpy (a decode step's
as a view of the VM's output tensor, not a copy)."""

from __future__ import annotations

import time

import numpy as np

from edge.errors import EdgeJitError

PAGE_SIZE = 16


def pages_for(tokens: int) -> int:
    """KV pages a sequence of `tokens` tokens holds (forked or not: blocks other than a sequence's
    last hold whole pages)."""
    return -(-int(tokens) // PAGE_SIZE)


def kv_bytes_per_token(config: dict) -> int:
    """KV cache bytes one token of context takes (all layers, K and V, in the cache's dtype)."""
    width = 2 if config.get("kv_cache_dtype") == "float16" else 4
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * width


class Decoder:
    def __init__(self, lib, params: list, config: dict, *, context: int, max_batch: int = 4,
                 prefill_chunk: int = 512, threads: int | None = None, kv_tokens: int | None = None):
        import tvm
        import tvm_ffi
        from tvm.runtime.vm import VirtualMachine  # tvm.relax needs the compiler library

        from edge.runtime.module import set_threads

        if threads:
            set_threads(threads)
        self.config = config
        self.threads = threads
        self.vm = VirtualMachine(lib, tvm.cpu())
        self.params = params
        self.context = int(context)
        self.max_batch = int(max_batch)  # sequences per forward call (the decode batch)
        self.prefill_chunk = int(min(prefill_chunk, self.context))
        # The page pool: `kv_tokens` tokens in all, shared by every sequence held (running or
        # retained by the prefix cache); by default `context` tokens for each of max_batch.
        kv_tokens = self.context * self.max_batch if kv_tokens is None else int(kv_tokens)
        if kv_tokens < self.context:
            raise EdgeJitError(f"a KV cache of {kv_tokens} tokens cannot hold one sequence of the context ({self.context} tokens)")
        self.total_pages = pages_for(kv_tokens)  # TVM allocates one more page than asked for
        S = tvm_ffi.Shape
        self.kv = self.vm["create_kv_cache"](S([self.max_batch]), S([self.total_pages * PAGE_SIZE]), S([self.prefill_chunk]),
                                            S([PAGE_SIZE]), S([0]))
        self.page_bytes = PAGE_SIZE * kv_bytes_per_token(config)
        self.kv_bytes = (self.total_pages + 1) * self.page_bytes  # allocated
        g = tvm.get_global_func
        self._add = g("vm.builtin.kv_state_add_sequence")
        self._remove = g("vm.builtin.kv_state_remove_sequence")
        self._fork = g("vm.builtin.kv_state_fork_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._popn = g("vm.builtin.kv_state_popn")
        self._available = g("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._Shape = S
        self.lengths: dict[int, int] = {}
        self.specializer = None  # edge.jit.Specializer over decode batch sizes (attach_jit)
        self.listeners: list = []  # on_request(model, batch, kind, seconds) per decode step
        self.name = ""

    # sequences -------------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        self._add(self.kv, int(seq_id))
        self.lengths[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        if seq_id in self.lengths:
            self._remove(self.kv, int(seq_id))
            del self.lengths[seq_id]

    def fork_sequence(self, parent: int, child: int, at: int = -1) -> None:
        """`child` starts as a copy of `parent`'s first `at` tokens (all when -1): whole pages are
        shared (neither sequence writes them again), a partly filled page at `at` is copied."""
        self._fork(self.kv, int(parent), int(child), int(at))
        self.lengths[child] = self.lengths[parent] if at < 0 else at

    def pop_tokens(self, seq_id: int, n: int) -> None:
        """Drop the last `n` tokens of a sequence."""
        if n:
            self._popn(self.kv, int(seq_id), int(n))
            self.lengths[seq_id] -= n

    def pages_in_use(self) -> int:
        return self.total_pages + 1 - int(self._available(self.kv))

    def _check_batch(self, n: int) -> None:
        if n > self.max_batch:
            raise EdgeJitError(f"at most {self.max_batch} sequences per step (got {n})")

    # forward ---------------------------------------------------------------------------------
    def prefill(self, seq_ids: list[int], chunks: list[list[int]]) -> np.ndarray:
        """Append each sequence's chunk of tokens (any lengths, ragged in one call) and return the
        logits after each chunk's last token, [len(seq_ids), vocab]. Longer inputs are split into
        calls of at most prefill_chunk tokens."""
        import tvm

        out = [None] * len(seq_ids)
        pending = [(i, list(c)) for i, c in enumerate(chunks) if c]
        for i, c in enumerate(chunks):
            if not c:
                raise EdgeJitError("empty prompt")
            if self.lengths[seq_ids[i]] + len(c) > self.context:
                raise EdgeJitError(
                    f"the prompt needs {self.lengths[seq_ids[i]] + len(c)} tokens of context; this model is loaded with {self.context}"
                )
        while pending:
            batch, budget, rest = [], self.prefill_chunk, []
            for i, c in pending:
                if budget <= 0:
                    rest.append((i, c))
                    continue
                take = c[:budget]
                batch.append((i, take))
                budget -= len(take)
                if len(c) > len(take):
                    rest.append((i, c[len(take):]))
            ids = np.concatenate([np.asarray(t, dtype=np.int32) for _, t in batch])
            lens = [len(t) for _, t in batch]
            positions = np.cumsum(lens, dtype=np.int32) - 1
            sids = [int(seq_ids[i]) for i, _ in batch]
            self._check_batch(len(sids))
            self._begin(self.kv, self._Shape(sids), self._Shape(lens))
            try:
                logits, self.kv = self.vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(positions), self.kv, self.params)
            finally:
                self._end(self.kv)
            logits = logits.numpy()
            for row, ((i, t), sid) in enumerate(zip(batch, sids)):
                self.lengths[sid] += len(t)
                out[i] = logits[row]
            pending = rest
        return np.stack(out)

    def score(self, seq_id: int, tokens: list[int]) -> np.ndarray:
        """Append `tokens` (at most prefill_chunk) and return the logits after every one of them,
        [len(tokens), vocab]: teacher-forced scoring (perplexity, top-1 agreement)."""
        import tvm

        if not 0 < len(tokens) <= self.prefill_chunk:
            raise EdgeJitError(f"score takes 1..{self.prefill_chunk} tokens")
        if self.lengths[seq_id] + len(tokens) > self.context:
            raise EdgeJitError(f"sequence {seq_id} would exceed the context length ({self.context} tokens)")
        self._begin(self.kv, self._Shape([int(seq_id)]), self._Shape([len(tokens)]))
        try:
            logits, self.kv = self.vm["prefill"](tvm.runtime.tensor(np.asarray(tokens, dtype=np.int32)),
                                                 tvm.runtime.tensor(np.arange(len(tokens), dtype=np.int32)), self.kv, self.params)
        finally:
            self._end(self.kv)
        self.lengths[seq_id] += len(tokens)
        return logits.numpy()

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One new token for each sequence, together: logits [len(seq_ids), vocab]."""
        import tvm

        for sid in seq_ids:
            if self.lengths[sid] + 1 > self.context:
                raise EdgeJitError(f"sequence {sid} reached the context length ({self.context} tokens)")
        sids = [int(s) for s in seq_ids]
        batch = len(sids)
        self._check_batch(batch)
        fn, kind = self._decode_fn(batch)
        self._begin(self.kv, self._Shape(sids), self._Shape([1] * batch))
        start = time.perf_counter()
        try:
            logits, self.kv = fn(tvm.runtime.tensor(np.asarray(tokens, dtype=np.int32)), self.kv, self.params)
        finally:
            self._end(self.kv)
        # A view of the VM's output, not a copy: it holds the tensor, so the allocator cannot hand
        # its memory to the next step while the caller keeps it.
        out = np.from_dlpack(logits)
        latency = time.perf_counter() - start
        for sid in sids:
            self.lengths[sid] += 1
        if self.specializer is not None:
            self.specializer.record(batch, kind)
        for listener in self.listeners:
            listener.on_request(self.name, batch, kind, latency)
        return out

    # JIT ------------------------------------------------------------------------------------
    def attach_jit(self, specializer) -> None:
        """Serve decode steps of a batch size the JIT has specialized from its variant (a module
        with the batch size static: the kernels' register tiles fit the rows); the generic
        module serves every other size and every prefill."""
        self.specializer = specializer

    def _decode_fn(self, batch: int):
        if self.specializer is not None:
            route = self.specializer.route(batch, {"num_seqs": batch})
            if route is not None:
                return route.module.vm()["decode"], "variant"
        return self.vm["decode"], "generic"
