"""edgejit's CPU attention kernels (edge/kernels/attention.py) against TVM's stock CPU kernels
they replace, on the same paged KV cache layout and arguments: same outputs, same log-sum-exp."""

from __future__ import annotations

import numpy as np
import pytest

from edge.kernels import attention

H_KV, H_Q, D, PAGE = 3, 9, 64, 16  # SmolLM2's attention shape


@pytest.fixture(scope="module")
def target():
    import tvm

    from edge.artifact.targets import get_preset

    return tvm.target.Target(get_preset("host").target)


def _build(func, target):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _run(fn, arrays, scalars):
    import tvm

    args = [tvm.runtime.tensor(a) for a in arrays]
    fn(*args, *scalars)
    return args[-2].numpy(), args[-1].numpy()


def _paged(rng, lengths, dtype):
    """A page pool with each sequence's pages scattered in it -> (pages, page indptr, page table, last page lengths)."""
    n_pages = [(n + PAGE - 1) // PAGE for n in lengths]
    pool = sum(n_pages) + 2
    pages = rng.standard_normal((pool, 2, H_KV, PAGE, D)).astype(dtype)
    table = rng.permutation(pool)[: sum(n_pages)].astype("int32")
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype("int32")
    last = np.array([n - (p - 1) * PAGE if p else 0 for n, p in zip(lengths, n_pages)], "int32")
    return pages, indptr, table, last


@pytest.mark.parametrize("lengths", [[1], [16], [17], [200], [5, 33, 1, 64]], ids=str)
def test_decode_matches_tvm_kernel(target, lengths):
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    rng = np.random.default_rng(len(lengths) * 1000 + lengths[0])
    pages, indptr, table, last = _paged(rng, lengths, "float32")
    b = len(lengths)
    q = rng.standard_normal((b, H_Q, D)).astype("float32")
    arrays = [q, pages, indptr, table, last, np.zeros(b, "int32"), np.zeros(b, "int32"),
              np.zeros((b, H_Q, D), "float32"), np.zeros((b, H_Q), "float32")]
    scalars = (0, 1.0, 10000.0, 0.125)
    want = _run(_build(_attention_decode_cpu(H_KV, H_Q, D, "float32", False, {}), target), arrays, scalars)
    got = _run(_build(attention.decode_paged_kv(H_KV, H_Q, D, PAGE), target), arrays, scalars)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("q_lens,kv_lens,causal", [([1], [1], 1), ([17], [17], 1), ([5], [5], 0), ([3, 0, 40], [3, 0, 40], 1),
                                                   ([4], [9], 1), ([130], [130], 1)], ids=str)
def test_prefill_ragged_matches_tvm_kernel(target, q_lens, kv_lens, causal):
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    rng = np.random.default_rng(sum(q_lens))
    qi = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    ki = np.concatenate([[0], np.cumsum(kv_lens)]).astype("int32")
    q = rng.standard_normal((qi[-1], H_Q, D)).astype("float32")
    k = rng.standard_normal((ki[-1], H_KV, D)).astype("float32")
    v = rng.standard_normal((ki[-1], H_KV, D)).astype("float32")
    arrays = [q, qi, k, v, ki, np.zeros(qi[-1], "int32"), np.zeros(len(q_lens), "int32"),
              np.zeros((qi[-1], H_Q, D), "float32"), np.zeros((qi[-1], H_Q), "float32")]
    scalars = (causal, 0, 1.0, 10000.0, 0.125)
    want = _run(_build(_attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float32", {}), target), arrays, scalars)
    got = _run(_build(attention.prefill_ragged(H_KV, H_Q, D), target), arrays, scalars)
    np.testing.assert_allclose(got[0], want[0], atol=3e-6, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("q_lens,kv_lens,causal", [([1], [16], 0), ([7], [33], 0), ([3, 0, 20], [17, 5, 64], 0),
                                                   ([5, 2], [0, 40], 0), ([9], [40], 1), ([16, 3], [16, 30], 1)], ids=str)
def test_prefill_paged_matches_tvm_kernel(target, q_lens, kv_lens, causal, dtype):
    """A chunk's queries against the pages its sequences already hold (prefix-cache hits, long
    prompts' later chunks): causal or not, sequences with no cached pages, fp32 and fp16 caches."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu

    rng = np.random.default_rng(sum(q_lens) + sum(kv_lens) + causal)
    pages, indptr, table, last = _paged(rng, kv_lens, dtype)
    qi = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    q = rng.standard_normal((qi[-1], H_Q, D)).astype(dtype)
    b = len(q_lens)
    arrays = [q, qi, pages, indptr, table, last, np.zeros(b, "int32"), np.zeros(qi[-1], "int32"),
              np.zeros((qi[-1], H_Q, D), dtype), np.zeros((qi[-1], H_Q), "float32")]
    scalars = (causal, 0, 1.0, 10000.0, 0.125)
    want = _run(_build(_attention_prefill_cpu(H_KV, H_Q, D, dtype, False, {}), target), arrays, scalars)
    got = _run(_build(attention.prefill_paged_kv(H_KV, H_Q, D, PAGE, dtype), target), arrays, scalars)
    tol = 3e-6 if dtype == "float32" else 2e-3  # fp16 outputs: rounded to 11 bits either way
    np.testing.assert_allclose(got[0].astype("float32"), want[0].astype("float32"), atol=tol, rtol=tol)
    np.testing.assert_allclose(got[1], want[1], atol=3e-5, rtol=1e-5)


def test_fp16_cache_kernels_match_tvm_kernels(target):
    """An fp16 KV cache (edgejit compile --kv-cache fp16): queries, pages and outputs in fp16, the
    math in fp32, against TVM's stock kernels of the same dtype."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    rng = np.random.default_rng(5)
    lengths = [5, 33, 200]
    pages, indptr, table, last = _paged(rng, lengths, "float16")
    b = len(lengths)
    q = rng.standard_normal((b, H_Q, D)).astype("float16")
    arrays = [q, pages, indptr, table, last, np.zeros(b, "int32"), np.zeros(b, "int32"),
              np.zeros((b, H_Q, D), "float16"), np.zeros((b, H_Q), "float32")]
    scalars = (0, 1.0, 10000.0, 0.125)
    want = _run(_build(_attention_decode_cpu(H_KV, H_Q, D, "float16", False, {}), target), arrays, scalars)
    got = _run(_build(attention.decode_paged_kv(H_KV, H_Q, D, PAGE, "float16"), target), arrays, scalars)
    np.testing.assert_allclose(got[0].astype("float32"), want[0].astype("float32"), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got[1], want[1], atol=3e-5, rtol=1e-5)

    q_lens = [17, 40]
    qi = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
    q, k, v = (rng.standard_normal((qi[-1], h, D)).astype("float16") for h in (H_Q, H_KV, H_KV))
    arrays = [q, qi, k, v, qi, np.zeros(qi[-1], "int32"), np.zeros(len(q_lens), "int32"),
              np.zeros((qi[-1], H_Q, D), "float16"), np.zeros((qi[-1], H_Q), "float32")]
    scalars = (1, 0, 1.0, 10000.0, 0.125)
    want = _run(_build(_attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float16", {}), target), arrays, scalars)
    got = _run(_build(attention.prefill_ragged(H_KV, H_Q, D, "float16"), target), arrays, scalars)
    np.testing.assert_allclose(got[0].astype("float32"), want[0].astype("float32"), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got[1], want[1], atol=3e-5, rtol=1e-5)


def test_stock_kernels_are_replaced_in_a_decoder_module(tiny_llamas):
    """The build swaps both kernels into a real decoder module (a tiny llama's); the model-level
    checks against transformers (tests/deploy/models, tests/edge/generate) run through them."""
    import tvm

    _, artifact = next(iter(tiny_llamas.values()))
    mod = tvm.ir.load_json((artifact / "module.json").read_text())
    names = {gv.name_hint: f for gv, f in mod.functions_items()}
    replaced = attention.replace_attention_kernels(mod)
    for name in ("batch_decode_paged_kv_cpu", "batch_prefill_ragged_kv", "batch_prefill_paged_kv_cpu"):
        assert name in names
        assert not replaced[name].same_as(names[name])
    for name in ("batch_decode_paged_kv_cpu_sliding_window", "batch_prefill_paged_kv_cpu_sliding_window"):
        assert replaced[name].same_as(names[name])
