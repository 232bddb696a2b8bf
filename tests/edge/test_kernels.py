"""CPU kernels (edge/kernels): scheduled code matches references on odd shapes, generic and bound
variants; aarch64 builds; pre-scheduled functions are left alone; the thread count is honoured."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from deploy.frontends.onnx import importer as onnx_import
from deploy.compiler import prepare as optimize
from edge.runtime import pipeline as edge_build
from edge import kernels
from edge.kernels import dense, packing, rules, target as ktarget
from edge.artifact.targets import get_preset


def _tvm_target(preset: str):
    return get_preset(preset).tvm_target()


# -- the packed dense kernel on its own: tails of the row tile, bias + GELU epilogue -------------
def _dense_func(m, k: int, n_cols: int, rows: int):
    import tvm
    from tvm import te, tirx

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    x = te.placeholder((i64(1), m, i64(k)), name="x")
    wp = te.placeholder((i64(n_cols // packing.PANEL), i64(k), i64(packing.PANEL)), name="wp")
    b = te.placeholder((i64(n_cols),), name="b")
    y = dense.compute(x, wp, rows)
    z = te.compute(y.shape, lambda i, s, j: y[i, s, j] + b[j], name="bias")
    g = te.compute(y.shape, lambda i, s, j: z[i, s, j] * 0.5 * (1 + te.erf(z[i, s, j] * 0.70710678)), name="gelu")
    return tvm.IRModule({"main": te.create_prim_func([x, wp, b, g])})


@pytest.mark.parametrize("n_cols", [96, 80], ids=["even_panels", "odd_panels"])
@pytest.mark.parametrize("symbolic", [True, False], ids=["dynamic_rows", "static_rows"])
def test_packed_dense_handles_row_tails(symbolic, n_cols):
    import math

    import tvm
    from tvm import s_tir, tirx

    erf = np.vectorize(math.erf)

    target = _tvm_target("host")
    rows = ktarget.tile_rows(target)
    k = 48  # N = 6 panels (3 two-panel tiles) or 5 (one-panel tiles)
    lengths = [1, 7, 257]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n_cols)).astype("float32")
    bias = rng.standard_normal(n_cols).astype("float32")
    libs = {}
    for m in lengths:
        key = "dyn" if symbolic else m
        if key not in libs:
            mod = _dense_func(tirx.Var("m", "int64") if symbolic else tirx.IntImm("int64", m), k, n_cols, rows)
            sch = s_tir.Schedule(mod)
            dense.schedule(
                sch, sch.get_sblock(dense.BLOCK_NAME), lanes=ktarget.vector_lanes(target), panels=ktarget.tile_panels(target)
            )
            libs[key] = tvm.compile(sch.mod, target=target).mod
        x = rng.standard_normal((1, m, k)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((1, m, n_cols), "float32"))
        args = [tvm.runtime.tensor(a) for a in (x, packing.pack_weight(w), bias)]
        libs[key]["main"](*args, out)
        z = x @ w + bias
        ref = z * 0.5 * (1 + erf(z * 0.70710678))
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symbolic", [True, False], ids=["dynamic_rows", "static_rows"])
def test_softmax_kernel_odd_lengths(symbolic):
    import tvm
    from tvm import s_tir, te, tirx

    from edge.kernels import softmax

    target = _tvm_target("host")
    lanes = ktarget.vector_lanes(target)
    rng = np.random.default_rng(0)
    libs = {}
    for n in (1, 7, 32, 257):
        key = "dyn" if symbolic else n
        if key not in libs:
            dim = tirx.Var("n", "int64") if symbolic else tirx.IntImm("int64", n)
            x = te.placeholder((tirx.IntImm("int64", 3), dim, dim), name="x")
            sch = s_tir.Schedule(te.create_prim_func([x, softmax.compute(x, lanes)]))
            softmax.schedule(sch, lanes)
            libs[key] = tvm.compile(sch.mod, target=target).mod
        a = (rng.standard_normal((3, n, n)) * 4).astype("float32")
        out = tvm.runtime.tensor(np.zeros_like(a))
        libs[key]["main"](tvm.runtime.tensor(a), out)
        e = np.exp(a - a.max(-1, keepdims=True))
        np.testing.assert_allclose(out.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_row_rule_symbolic_reduction():
    """A row reduction over a symbolic axis (here x - mean(x)) is scheduled and stays exact."""
    import tvm
    from tvm import te, tirx

    n = tirx.Var("n", "int64")
    x = te.placeholder((tirx.IntImm("int64", 5), n), name="x")
    k = te.reduce_axis((tirx.IntImm("int64", 0), n), name="k")
    total = te.compute((x.shape[0],), lambda i: te.sum(x[i, k], axis=k), name="total")
    out = te.compute(x.shape, lambda i, j: x[i, j] - total[i] / n.astype("float32"), name="centered")
    func = te.create_prim_func([x, out])
    target = _tvm_target("host")
    sch = rules.schedule_func(func, target)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=target).mod
    for length in (1, 7, 257):
        a = np.random.default_rng(length).standard_normal((5, length)).astype("float32")
        got = tvm.runtime.tensor(np.zeros_like(a))
        lib["main"](tvm.runtime.tensor(a), got)
        np.testing.assert_allclose(got.numpy(), a - a.mean(-1, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symbolic,one_row", [(True, False), (False, False), (False, True)],
                         ids=["dynamic_rows", "static_rows", "one_row"])
def test_lane_rule_layer_norm(symbolic, one_row):
    """Layer norm over a static hidden size: the lane-partial reduction rule takes it and the
    result matches numpy, for symbolic and static row counts, and for the single row of a decode
    step of one sequence (dlight's fallback recomputed the whole row's sum for every element: 0.18
    ms per norm instead of 1 us)."""
    import tvm
    from tvm import relax, tirx

    from edge.kernels import rules

    hidden = 384
    rows = tirx.Var("rows", "int64") if symbolic else 9
    shape = (1, 1, hidden) if one_row else (rows, hidden)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    g = relax.Var("g", relax.TensorType((hidden,), "float32"))
    b = relax.Var("b", relax.TensorType((hidden,), "float32"))
    with bb.function("main", [x, g, b]):
        bb.emit_func_output(bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1])))
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    target = _tvm_target("host")
    sch = tvm.s_tir.Schedule(func)
    assert rules._lane_rule(sch, target)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target).mod
    rng = np.random.default_rng(0)
    gamma, beta = rng.standard_normal(hidden).astype("float32"), rng.standard_normal(hidden).astype("float32")
    for n in ((1, 7, 257) if symbolic else (9,)):
        a = (rng.standard_normal((1, 1, hidden) if one_row else (n, hidden)) * 3 + 1).astype("float32")
        got = tvm.runtime.tensor(np.zeros_like(a))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(gamma), tvm.runtime.tensor(beta), got)
        want = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5) * gamma + beta
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_pack_weight_layout():
    w = np.arange(6 * 32, dtype="float32").reshape(6, 32)
    p = packing.pack_weight(w)
    assert p.shape == (2, 6, 16)
    assert p[1, 4, 3] == w[4, 16 + 3]


# -- whole models from real exporters, generic and bound variants, against ONNX Runtime -----------
def _feeds(model_path, seq: int, rng):
    import onnxruntime as ort

    from edge.runtime.samples import token_inputs

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess, token_inputs([i.name for i in sess.get_inputs()], seq, vocab=100, seed=rng)


def _run(ex, params, arrays):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays], *[tvm.runtime.tensor(p) for p in params])
    first = out if hasattr(out, "numpy") else out[0]
    return first.numpy()


def _prepared(model_path, preset="host"):
    model = onnx_import.load(model_path)
    mod, params = onnx_import.to_relax(model)
    mod, params = optimize.prepare(mod, params, _tvm_target(preset))
    return mod, params


@pytest.mark.parametrize("fixture", ["bert_onnx", "gpt2_onnx"])
def test_generic_and_variant_match_onnxruntime(fixture, request):
    model_path = request.getfixturevalue(fixture)
    mod, params = _prepared(model_path)
    assert any(p.ndim == 3 for p in params), "no weight was packed"
    target = get_preset("host").target
    generic = edge_build.build(mod, target)
    rng = np.random.default_rng(1)
    for seq in (1, 7, 257):
        sess, feeds = _feeds(model_path, seq, rng)
        ref = sess.run(None, feeds)[0]
        got = _run(generic, params, list(feeds.values()))
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4, err_msg=f"generic, seq {seq}")
    variant = edge_build.build(mod, target, bind={"seq": 7})
    sess, feeds = _feeds(model_path, 7, rng)
    np.testing.assert_allclose(_run(variant, params, list(feeds.values())), sess.run(None, feeds)[0], rtol=1e-3, atol=1e-4)


def test_transformer_kernels_are_scheduled(bert_onnx):
    """Dense, attention matmuls, softmax and layer norm all come out of the rules scheduled."""
    from tvm import tirx

    mod, _ = _prepared(bert_onnx)
    target = _tvm_target("host")
    out = kernels.optimize(mod, target)
    names = {gv.name_hint: f for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)}
    for key in ("dense_packed", "matmul", "softmax", "layer_norm"):
        funcs = [n for n in names if key in n]
        assert funcs, f"no {key} function in the module"
        unscheduled = [n for n in funcs if not rules.is_scheduled(names[n])]
        assert not unscheduled, f"left unscheduled: {unscheduled}"


def test_prescheduled_functions_are_left_alone():
    import tvm
    from tvm import te, tirx

    a = te.placeholder((tirx.IntImm("int64", 64),), name="a")
    b = te.compute(a.shape, lambda i: a[i] * 2.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("tirx.is_scheduled", True)
    mod = tvm.IRModule({"kernel": func})
    out = rules.schedule_module(mod, _tvm_target("host"))
    tvm.ir.assert_structural_equal(out["kernel"], func)


# -- targets -----------------------------------------------------------------------------------
def test_vector_width_and_tiles_follow_the_target():
    assert ktarget.vector_lanes(_tvm_target("x86-64-avx2")) == 8
    assert ktarget.vector_lanes(_tvm_target("x86-64-avx512")) == 16
    assert ktarget.vector_lanes(_tvm_target("aarch64")) == 4
    assert ktarget.tile_rows(_tvm_target("x86-64-avx512")) == 8
    assert ktarget.tile_rows(_tvm_target("x86-64-avx2")) == 6
    assert ktarget.tile_rows(_tvm_target("rpi4")) == 4


def test_aarch64_build_cross_compiles(bert_onnx, tmp_path):
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64 linker not installed")
    mod, _ = _prepared(bert_onnx, "rpi5")
    target = get_preset("rpi5").target
    edge_build.export(edge_build.build(mod, target), tmp_path / "generic.so", target)
    edge_build.export(edge_build.build(mod, target, bind={"seq": 16}), tmp_path / "v16.so", target)
    for so in ("generic.so", "v16.so"):
        head = (tmp_path / so).read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


# -- threads -----------------------------------------------------------------------------------
def _busy_threads(fn, repeat: int) -> int:
    def ticks():
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/stat") as f:
                    out[t] = int(f.read().rsplit(")", 1)[1].split()[11])
            except OSError:
                pass
        return out

    before = ticks()
    for _ in range(repeat):
        fn()
    after = ticks()
    return sum(1 for t, v in after.items() if v - before.get(t, 0) >= 3)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_set_threads_controls_parallelism():
    import tvm
    from tvm import s_tir, tirx

    from edge.runtime.module import set_threads

    target = _tvm_target("host")
    mod = _dense_func(tirx.IntImm("int64", 256), 256, 512, ktarget.tile_rows(target))
    sch = s_tir.Schedule(mod)
    dense.schedule(sch, sch.get_sblock(dense.BLOCK_NAME), lanes=ktarget.vector_lanes(target))
    lib = tvm.compile(sch.mod, target=target).mod
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32")) for s in [(1, 256, 256), (32, 256, 16), (512,), (1, 256, 512)]]
    run = lambda: lib["main"](*args)  # noqa: E731
    set_threads(1)
    assert _busy_threads(run, 300) == 1
    set_threads(2)
    assert _busy_threads(run, 300) == 2


def test_decode_gets_a_small_row_tile(tiny_llamas):
    """Dense layers whose rows are the sequences (`num_seqs`: every one in `decode`, the LM head in
    `prefill`) get `decode_tile_rows`, those over a chunk's tokens the full tile: an 8-row tile
    cost one sequence 8 rows."""
    import tvm
    from tvm import relax

    _, artifact = next(iter(tiny_llamas.values()))
    mod = tvm.ir.load_json((artifact / "module.json").read_text())
    target = _tvm_target("x86-64-avx512")
    assert (ktarget.tile_rows(target), ktarget.decode_tile_rows(target)) == (8, 4)
    mod = packing.rewrite_packed_dense(mod, 8, var_rows={"num_seqs": 4})

    def tile_rows_called_by(name):
        rows = set()

        def visit(e):
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
                func = mod[e.args[0]]
                if e.args[0].name_hint.startswith(("dense_quant", "dense_packed")):
                    # the tile buffer [ceil(M / rows), panels, rows, 16]
                    lines = [ln for ln in func.script().splitlines() if dense.BLOCK_NAME + " = T.sblock_alloc_buffer" in ln]
                    rows.update(int(re.findall(r"(\d+)\)?, T\.int64\(16\)\)\)", ln)[-1]) for ln in lines)

        relax.analysis.post_order_visit(mod[name].body, visit)
        return rows

    assert tile_rows_called_by("decode") == {4}
    assert tile_rows_called_by("prefill") == {8, 4}  # the LM head takes one row per sequence



def test_kernels_keep_their_alias_information(tiny_llamas):
    """No vector load or store in a decoder's compiled kernels falls back to TVM's catch-all "may alias
    anything" type: TVM 0.27 applies the noalias flag of the module's last function to all of them,
    and TVM's own KV-cache kernels have none (kernels.mark_noalias). Without the information LLVM
    kept the dense tiles' accumulators in memory (prefill 2.6x slower)."""
    import tvm

    _, artifact = next(iter(tiny_llamas.values()))
    mod = tvm.ir.load_json((artifact / "module.json").read_text())
    executable = edge_build.build(mod, get_preset("host").target)
    ir = next(src for m in [executable.mod, *executable.mod.imports] if "tvm-tbaa" in (src := _llvm_ir(m)))
    alias_nodes = re.findall(r'^(![0-9]+) = !\{!"tvm-alias", ', ir, re.M)
    alias_tags = {t for node in alias_nodes for t in re.findall(rf"^(![0-9]+) = !\{{{node}, {node}, i64 0\}}", ir, re.M)}
    vector = [ln for ln in ir.splitlines() if re.search(r"(load|store) <[0-9]+ x float>", ln)]
    uses = [ln for ln in vector if set(re.findall(r"!tbaa (![0-9]+)", ln)) & alias_tags]
    assert vector and not uses, f"{len(uses)} vector accesses without alias information, e.g. {uses[:1]}"


def _llvm_ir(module) -> str:
    try:
        return module.inspect_source("ll")
    except Exception:
        return ""


@pytest.mark.parametrize("rows,symbolic", [(1, False), (2, False), (2, True), (4, False)], ids=str)
@pytest.mark.parametrize("bits", [4, 8, "8s"])
@pytest.mark.parametrize("preset", ["host", "x86-64-avx2", "rpi4"])
def test_quant_dense_few_rows_split_and_prefetch(rows, symbolic, bits, preset):
    """Few-row tiles of the weight-only dense with a static row count get the K split and the
    prefetches; every tile still computes x @ dequant(W) (against numpy), static or symbolic; "8s":
    symmetric 8-bit codes without a zero tensor (Q8_0). Also with one 16-column panel per tile
    (AVX2, NEON), where a symmetric layer's tile has one scale stream to prefetch: that rule once
    failed there and left the 576 x 49152 Q8_0 LM head of a batch-1 step unscheduled (AVX2: 24.9 ms
    instead of 1.05). A target this machine cannot run (ARM) is scheduled and compiled, not run."""
    import tvm
    from tvm import te, tirx

    k_dim, n_cols, group = 256, 64, 32
    symmetric = bits == "8s"
    bits = 8 if symmetric else bits
    m = tirx.Var("m", "int64") if symbolic else rows
    x = te.placeholder((1, m, k_dim), "float32", name="x")
    codes_shape = (n_cols // 16, k_dim // 2 if bits == 4 else k_dim, 16)
    wq = te.placeholder(codes_shape, "uint8" if bits == 4 else "int8", name="wq")
    sc = te.placeholder((n_cols // 16, k_dim // group, 16), "float16", name="sc")  # as the host packs them
    ze = te.placeholder((n_cols // 16, k_dim // group, 16), "float16", name="ze")
    if symmetric:
        func = te.create_prim_func([x, wq, sc, dense.compute_quant_sym(x, wq, sc, rows)])
    else:
        func = te.create_prim_func([x, wq, sc, ze, dense.compute_quant(x, wq, sc, ze, rows)])
    target = _tvm_target(preset)
    sch = rules.schedule_func(func, target)
    script = sch.mod["main"].script()
    accumulators = rows * ktarget.tile_panels(target) * (16 // ktarget.vector_lanes(target))
    assert ("llvm.prefetch" in script) == (accumulators < dense.KREGS and not symbolic)  # a K split, prefetched
    assert "T.parallel" in script  # scheduled (an unscheduled function has no parallel loop)
    if not get_preset(preset).runs_here():
        tvm.compile(sch.mod, target=target)
        return
    lib = tvm.compile(sch.mod, target=target)["main"]
    rng = np.random.default_rng(rows * 10 + bits)
    codes = rng.integers(0, 256, codes_shape).astype("uint8") if bits == 4 else rng.integers(-128, 128, codes_shape).astype("int8")
    scale, zero = (rng.standard_normal((n_cols // 16, k_dim // group, 16)).astype("float16") for _ in range(2))
    zero = np.zeros_like(zero) if symmetric else zero
    q = (np.stack([codes & 15, codes >> 4], axis=2).reshape(n_cols // 16, k_dim, 16) if bits == 4 else codes).astype("float32")
    g = np.repeat(np.arange(k_dim // group), group)
    w = (q * scale[:, g, :].astype("float32") + zero[:, g, :].astype("float32")).transpose(1, 0, 2).reshape(k_dim, n_cols)
    for n in ((1, 2, 3, 5) if symbolic else (rows,)):
        a = rng.standard_normal((1, n, k_dim)).astype("float32")
        got = tvm.runtime.tensor(np.zeros((1, n, n_cols), "float32"))
        lib(*(tvm.runtime.tensor(v) for v in (a, codes, scale) + (() if symmetric else (zero,))), got)
        np.testing.assert_allclose(got.numpy(), a @ w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows,symbolic", [(1, False), (2, False), (4, False), (2, True)], ids=str)
def test_f16_dense_widens_and_prefetches(rows, symbolic):
    """The packed dense on fp16 weights (a GGUF F16 file's) computes x @ float32(W), and its
    few-row static tiles get the K split and the prefetches like the quantized kernel's."""
    import tvm
    from tvm import te, tirx

    k_dim, n_cols = 256, 64
    m = tirx.Var("m", "int64") if symbolic else rows
    x = te.placeholder((1, m, k_dim), "float32", name="x")
    wp = te.placeholder((n_cols // 16, k_dim, 16), "float16", name="wp")
    func = te.create_prim_func([x, wp, dense.compute(x, wp, rows)])
    target = _tvm_target("host")
    sch = rules.schedule_func(func, target)
    assert ("llvm.prefetch" in sch.mod["main"].script()) == (rows <= 2 and not symbolic)
    lib = tvm.compile(sch.mod, target=target)["main"]
    rng = np.random.default_rng(rows)
    w16 = rng.standard_normal((n_cols // 16, k_dim, 16)).astype("float16")
    w = w16.astype("float32").transpose(1, 0, 2).reshape(k_dim, n_cols)
    for n in ((1, 2, 3, 5) if symbolic else (rows,)):
        a = rng.standard_normal((1, n, k_dim)).astype("float32")
        got = tvm.runtime.tensor(np.zeros((1, n, n_cols), "float32"))
        lib(tvm.runtime.tensor(a), tvm.runtime.tensor(w16), got)
        np.testing.assert_allclose(got.numpy(), a @ w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3, 1), (2, 2)], ids=str)
def test_f16_decode_kernel_is_the_dense_of_widened_weights(lead):
    """The hand-written fp16 kernel for a decode step's static 1-4 rows computes x @ float32(W)
    (against numpy, float rounding aside), every row count and layout of the leading dims; it also
    compiles for aarch64 (NEON's fcvtl widens the weights)."""
    import tvm

    from edge.kernels import dense_f16

    k_dim, n_cols = 192, 80
    rng = np.random.default_rng(len(lead) * 10 + lead[0])
    w16 = rng.standard_normal((n_cols // 16, k_dim, 16)).astype("float16")
    w = w16.astype("float32").transpose(1, 0, 2).reshape(k_dim, n_cols)
    func = dense_f16.primfunc(list(lead), n_cols, k_dim).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=_tvm_target("host"))["main"]
    a = rng.standard_normal((*lead, k_dim)).astype("float32")
    got = tvm.runtime.tensor(np.zeros((*lead, n_cols), "float32"))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(w16), got)
    np.testing.assert_allclose(got.numpy(), a @ w, rtol=1e-4, atol=1e-4 * np.abs(a @ w).max())
    tvm.compile(tvm.IRModule({"main": func}), target=_tvm_target("rpi4"))


@pytest.mark.parametrize("rows,lanes,want", [(1, 16, "dense_f16"), (4, 16, "dense_f16"), (5, 16, "dense_packed"),
                                             ("num_seqs", 16, "dense_packed"), (1, 8, "dense_f16"), (2, 8, "dense_packed"),
                                             (1, 4, "dense_f16"), (2, 4, "dense_packed")], ids=str)
def test_f16_matmuls_of_a_decode_step_take_the_f16_kernel(rows, lanes, want):
    """fp16 weights times a static 1-4 rows (a decode step of a known batch size, the LM head in
    it) get the hand-written kernel where their sums fit in half the vector registers (AVX-512: 4
    rows; AVX2, NEON: 1); more rows and symbolic rows (the generic module, prefill) keep the
    scheduled one."""
    import tvm
    from tvm import relax, tirx

    k_dim, n_cols = 64, 32
    m = tirx.Var(rows, "int64") if isinstance(rows, str) else rows
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k_dim), "float32"))
    w16 = relax.Var("w16", relax.TensorType((n_cols // 16, k_dim, 16), "float16"))
    with bb.function("main", [x, w16]):
        with bb.dataflow():
            wp = bb.emit(bb.call_te(dense.widen, w16, primfunc_name_hint="widen_f16"))
            w = bb.emit(relax.op.reshape(relax.op.permute_dims(wp, [1, 0, 2]), (k_dim, n_cols)))
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    out = packing.rewrite_packed_dense(bb.get(), 8, var_rows={"num_seqs": 4}, lanes=lanes)
    names = {gv.name_hint for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(n.startswith(want) for n in names), names
    assert not any(n.startswith("widen_f16") for n in names), names


# -- int8-activation dense (AVX-512 VNNI, AVX-VNNI, AVX2; ARM dotprod under emulation: tests/arm) -
# (instruction set, a preset with it) for the ones this host can run
_INT8ACT = [(isa, preset) for isa, preset in (("vnni512", "x86-64-avx512"), ("avxvnni", "x86-64-avxvnni"), ("avx2", "x86-64-avx2"))
            if get_preset(preset).runs_here()]


def _int8act_isas():
    return pytest.mark.parametrize("isa,preset", _INT8ACT or [pytest.param(None, None, marks=pytest.mark.skip(
        reason="the host CPU has no int8 dot products"))], ids=str)


def _quant_weights(rng, bits: int, k_dim: int, n_cols: int, group: int, symmetric: bool = False):
    """Packed codes, scale, zero (fp16) in the kernels' layout, and the float weight [K, N] they
    stand for (symmetric: zero all 0, as Q8_0's)."""
    codes_shape = (n_cols // 16, k_dim // 2 if bits == 4 else k_dim, 16)
    codes = rng.integers(0, 256, codes_shape).astype("uint8") if bits == 4 else rng.integers(-128, 128, codes_shape).astype("int8")
    scale = (rng.random((n_cols // 16, k_dim // group, 16)) * 0.02 + 0.01).astype("float16")
    zero = (-8 * scale if bits == 4 else rng.standard_normal(scale.shape) * 0.01).astype("float16")  # Q4_1-like
    zero = np.zeros_like(scale) if symmetric else zero
    q = (np.stack([codes & 15, codes >> 4], axis=2).reshape(n_cols // 16, k_dim, 16) if bits == 4 else codes).astype("float32")
    g = np.repeat(np.arange(k_dim // group), group)
    w = (q * scale[:, g, :].astype("float32") + zero[:, g, :].astype("float32")).transpose(1, 0, 2).reshape(k_dim, n_cols)
    return codes, scale, zero, w


@_int8act_isas()
@pytest.mark.parametrize("bits", [4, 8, "8s"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8act_dense_is_the_dense_of_int8_activations(rows, bits, isa, preset):
    """The int8-activation dense computes x' @ W exactly (float rounding aside), where x' is x quantized
    to int8 per weight group of 32 (scale max|x| / 127, as llama.cpp's Q8_1); and x' @ W is within
    3% of x @ W with an outlier channel (30x) in the activations."""
    import tvm

    from edge.kernels import dense_int8act

    k_dim, n_cols, group = 192, 64, 32
    symmetric = bits == "8s"  # Q8_0: no zero tensor
    bits = 8 if symmetric else bits
    rng = np.random.default_rng(rows * 10 + bits)
    codes, scale, zero, w = _quant_weights(rng, bits, k_dim, n_cols, group, symmetric)
    func = dense_int8act.primfunc((1, rows, k_dim), n_cols, k_dim, k_dim // group, bits, isa, zero=not symmetric)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=_tvm_target(preset))["main"]
    a = rng.standard_normal((1, rows, k_dim)).astype("float32")
    a[..., 5] *= 30  # an outlier channel, as real activations have
    got = tvm.runtime.tensor(np.zeros((1, rows, n_cols), "float32"))
    lib(*(tvm.runtime.tensor(v) for v in (a, codes, scale) + (() if symmetric else (zero,))), got)
    groups = a.reshape(1, rows, k_dim // group, group)
    xs = np.abs(groups).max(-1, keepdims=True) / 127
    xq = (np.round(groups / np.where(xs > 0, xs, 1)) * xs).reshape(a.shape)
    np.testing.assert_allclose(got.numpy(), xq @ w, rtol=1e-4, atol=1e-4 * np.abs(xq @ w).max())
    exact = a @ w
    assert np.abs(got.numpy() - exact).max() < 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("preset,rows,want", [
    ("x86-64-avx512", 1, "vnni512"), ("x86-64-avx512", 8, "vnni512"), ("x86-64-avx512", 12, "vnni512"),
    ("x86-64-avx512", "num_seqs", "vnni512"), ("x86-64-avx512", "seq", "vnni512"), ("x86-64-avx512-vbmi", 1, "vnni512"),
    ("x86-64-avx2", 1, "avx2"), ("x86-64-avx2", "seq", "avx2"), ("x86-64-avxvnni", 1, "avxvnni"), ("rpi5", "num_seqs", "dotprod"), ("jetson-orin", 1, "dotprod"),
    ("aarch64", 1, None), ("rpi4", 1, None),
], ids=str)
def test_int8act_dense_takes_every_row_count_on_targets_with_int8_dot_products(preset, rows, want):
    """In a module compiled for int8 activations, quantized matmuls of static rows (a decode step
    of a known batch size, 12: more than one chunk), of the sequences (`num_seqs`, symbolic) or of
    a prefill chunk's tokens (`seq`) get the int8-activation kernel on targets with int8 dot
    products (AVX-512 VNNI, AVX2, ARM dotprod); ARMv8.0 targets keep the fp32-activation kernel. Modules compiled before prefill took int8 activations
    carry the attribute's old name and get it too."""
    import tvm
    from tvm import relax, tirx

    from edge.kernels import dense_int8act

    k_dim, n_cols = 64, 32
    m = tirx.Var(rows, "int64") if isinstance(rows, str) else rows
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, m, k_dim), "float32"))
    wq = relax.Var("wq", relax.TensorType((n_cols // 16, k_dim // 2, 16), "uint8"))
    sc = relax.Var("sc", relax.TensorType((n_cols // 16, k_dim // 32, 16), "float16"))
    ze = relax.Var("ze", relax.TensorType((n_cols // 16, k_dim // 32, 16), "float16"))
    with bb.function("main", [x, wq, sc, ze]):
        with bb.dataflow():
            wp = bb.emit(bb.call_te(dense.dequant, wq, sc, ze, primfunc_name_hint="dequant_q4"))
            w = bb.emit(relax.op.reshape(relax.op.permute_dims(wp, [1, 0, 2]), (k_dim, n_cols)))
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    target = _tvm_target(preset)
    assert dense_int8act.isa(target) == want
    mod = bb.get().with_attr(kernels.MATMUL_ACTIVATIONS_ATTR, "int8")
    assert kernels.int8_matmuls(bb.get(), target) is None  # fp32 unless the compile asked for int8
    assert kernels.int8_matmuls(bb.get().with_attr("edgejit_decode_activations", "int8"), target) == want
    int8 = kernels.int8_matmuls(mod, target)
    out = packing.rewrite_packed_dense(mod, 8, var_rows={"num_seqs": 4}, int8=int8)
    names = {gv.name_hint for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(n.startswith("dense_int8act" if want else "dense_quant") for n in names), names
    assert not any(n.startswith("dequant_q4") for n in names), names


@_int8act_isas()
@pytest.mark.parametrize("bits", [4, 8])
def test_int8act_dense_rows_do_not_depend_on_the_batch(bits, isa, preset):
    """A row's result is the same bits whether it is decoded alone (the batch-1 variant), with
    others (a batch-3 variant) or in the generic module (symbolic rows, 4 at a time, a chunk's
    tail re-reading the last row): a reply does not change with who else is being served."""
    import tvm
    from tvm import tirx

    from edge.kernels import dense_int8act

    k_dim, n_cols, group = 128, 48, 32
    rng = np.random.default_rng(bits)
    codes, scale, zero, _ = _quant_weights(rng, bits, k_dim, n_cols, group)
    target = _tvm_target(preset)

    def build(lead, chunk=None):
        func = dense_int8act.primfunc([*lead, k_dim], n_cols, k_dim, k_dim // group, bits, isa, chunk=chunk)
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]

    def run(f, a):
        got = tvm.runtime.tensor(np.zeros((*a.shape[:-1], n_cols), "float32"))
        f(*(tvm.runtime.tensor(v) for v in (a, codes, scale, zero)), got)
        return got.numpy()

    one, three, generic = build([1, 1]), build([3, 1]), build([tirx.Var("num_seqs", "int64"), 1], chunk=4)
    twelve = build([12, 1])  # more than MAX_ROWS: in chunks too
    a = rng.standard_normal((9, 1, k_dim)).astype("float32")
    alone = np.concatenate([run(one, a[i:i + 1]) for i in range(9)])
    for n in (1, 2, 5, 9):
        np.testing.assert_array_equal(run(generic, a[:n]), alone[:n])
    np.testing.assert_array_equal(run(three, a[:3]), alone[:3])
    b = rng.standard_normal((12, 1, k_dim)).astype("float32")
    np.testing.assert_array_equal(run(twelve, b), np.concatenate([run(one, b[i:i + 1]) for i in range(12)]))
