"""`edgejit compile MODEL.gguf|CHECKPOINT_DIR|DECODER.onnx`: a text-generation model -> decoder artifact for a target preset.

file -> frontend (deploy/frontends/gguf, deploy/frontends/hf, or deploy/frontends/onnx/decoder for ONNX decoders with
past key values: config, tensors, tokenizer) -> model definition
(deploy/models/<arch>: relax.frontend.nn over TVM's paged KV cache, weights mapped onto it)
-> build (edge/runtime/pipeline: the same pipeline the device JIT uses) -> artifact.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

from edge.artifact.manifest import DecoderInfo, DimRange, Manifest, ModelInfo, TensorSpec, TokenizerInfo
from edge.artifact.reader import sha256_file
from edge.artifact.targets import Preset, get_preset
from edge.errors import EdgeJitError
from edge.generate.decoder import kv_bytes_per_token
from edge import kernels
from edge.kernels import dense_int8act
from edge.runtime import pipeline

from deploy.compiler import signing
from deploy.compiler.artifact_writer import ArtifactWriter, build_fields
from deploy.frontends.gguf import tokenizer as gguf_tokenizer
from deploy.frontends.gguf.reader import GGUFFile
from deploy.models import registry
from deploy.quantize.weight_only.layout import F16, storage_name

DEFAULT_CONTEXT = 4096  # what the runtime allocates unless told otherwise (llama.cpp's default too)
PREFILL_CHUNK = 512  # most prompt tokens per prefill call: bounds activation memory
MAX_DECODE_BATCH = 64  # most sequences one decode step takes
KV_CACHE_DTYPES = {"fp32": "float32", "fp16": "float16"}


@dataclasses.dataclass
class LoadedModel:
    """A model read from its file, in the model definition's terms."""

    arch: str
    config: object  # the architecture's Config dataclass
    weights: dict  # Hugging Face names and layout, fp32
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_info: dict
    source: dict
    sha256: str = ""  # of the source (a directory: of its config and weight files)


def load_gguf(path: Path, log=print, *, quantized: bool = True) -> LoadedModel:
    """With `quantized`, matrices stored quantized stay quantized (weight-only kernels), else fp32."""
    f = GGUFFile(path)
    model = registry.get(registry.gguf_arch(f.architecture, source=path.name))
    cfg = model.config_from_gguf(f)
    t0 = time.perf_counter()
    weights = model.weights_from_gguf(f, cfg, quantized=quantized)
    types = dict(collections.Counter(f.tensor_type(n) for n in f.tensors))
    log(f"read {path.name}: {f.architecture}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; tensors "
        + ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        + (f"; {len(cfg.quant)} linear layers kept as stored ("
           + ", ".join(f"{n} {k}" for k, n in sorted(_layer_counts(cfg.quant).items()))
           + ")" if cfg.quant else ", dequantized to fp32")
        + f" ({time.perf_counter() - t0:.1f}s)")
    tok, info = gguf_tokenizer.build(f)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise EdgeJitError(f"{path.name}: the tokenizer has more tokens ({tok.get_vocab_size()}) than the model's vocabulary ({cfg.vocab_size})")
    return LoadedModel(f.architecture, cfg, weights, tok, info, {"format": "gguf", "tensor_types": types}, sha256_file(path))


def load_hf(path: Path, log=print) -> LoadedModel:
    """A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json, ...)."""
    from deploy.frontends.hf import tokenizer as hf_tokenizer
    from deploy.frontends.hf.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    arch = registry.hf_arch(ckpt.config.get("architectures"), source=str(path / "config.json"))
    model = registry.get(arch)
    cfg = model.config_from_hf(ckpt.config, str(path / "config.json"))
    tok, info = hf_tokenizer.load(path, ckpt.config)
    t0 = time.perf_counter()
    weights = model.weights_from_hf(ckpt, cfg)
    types = ckpt.tensor_types()
    log(f"read {path.name}: {ckpt.config['architectures'][0]} ({arch}), {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; {len(ckpt.files)} safetensors file(s), "
        + ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        + f", converted to fp32 ({time.perf_counter() - t0:.1f}s)")
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise EdgeJitError(f"{path / 'tokenizer.json'}: the tokenizer has more tokens ({tok.get_vocab_size(with_added_tokens=True)}) "
                           f"than the model's vocabulary ({cfg.vocab_size})")
    return LoadedModel(arch, cfg, weights, tok, info, {"format": "hf", "tensor_types": types,
                                                       "architectures": ckpt.config["architectures"]}, ckpt.sha256())


def load_onnx(path: Path, log=print) -> LoadedModel:
    """An ONNX decoder with past key values (a .onnx file or optimum's output directory): its weights
    mapped onto our model definition and checked against ONNX Runtime (deploy/frontends/onnx/decoder)."""
    from deploy.frontends.onnx import decoder as onnx_decoder

    d = onnx_decoder.read(path, log=log)
    return LoadedModel(d.arch, d.config, d.weights, d.tokenizer, d.tokenizer_info, d.source, d.sha256)


def input_format(path: Path) -> str:
    """"gguf", "hf" (a checkpoint directory) or "onnx" (a decoder graph, or a directory holding one and no safetensors)."""
    if path.is_dir():
        return "onnx" if not any(path.glob("*.safetensors")) and any(path.glob("*.onnx")) else "hf"
    return "onnx" if path.suffix.lower() == ".onnx" else "gguf"


def export_module(arch: str, cfg, target: dict):
    """-> (Relax IRModule with prefill / decode / create_kv_cache, parameter names in call order)."""
    import tvm

    model = registry.get(arch).Model(cfg)
    with tvm.target.Target(target):
        mod, named = model.export_tvm(spec=model.get_default_spec())
    # TVM generates the KV cache's attention and copy kernels ready to compile; the rules
    # schedule only the functions the model's own operators lower to.
    for gv, fn in list(mod.functions_items()):
        if isinstance(fn, tvm.tirx.PrimFunc):
            mod[gv] = fn.with_attr("tirx.is_scheduled", True)
    return mod, [n for n, _ in named]


def _precision(cfg) -> str:
    """fp32, or the weight-only bit widths kept from the file (activations stay fp32)."""
    bits = sorted({b for b in getattr(cfg, "quant", {}).values()})
    return "fp32" if not bits else "w" + "/".join(storage_name(b) for b in bits)


def _layer_counts(quant: dict) -> dict[str, int]:
    """Linear layers per storage kind ({"q4": 120, "q8": 1})."""
    return dict(collections.Counter(storage_name(b) for b in quant.values()))


def _quantization(cfg, host: dict | None = None, int8: str | None = None) -> dict | None:
    """`host`: what --precision q4|q8 did (deploy/quantize/weight_only/schemes.py), else the file's
    own quantization; `int8`: the int8-activation kernel's instruction set (kernels.int8_matmuls)."""
    quant = getattr(cfg, "quant", {})
    if not quant:
        return None
    return {"scheme": "weight-only", "group": 32, "layers": _layer_counts(quant),
            "activations": "int8 per group of 32 (prefill, decode steps and the LM head)" if int8 else "fp32",
            "kernel": f"edge/kernels/dense_int8act (int8 activations, {dense_int8act.INSTRUCTIONS[int8]})" if int8 else
                      "edge/kernels/dense.compute_quant (codes dequantized in the inner loop)",
            "f16_kernel": "edge/kernels/dense.compute (fp16 weights widened in the inner loop)", **(host or {})}


FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")


def _host_quantize(m: LoadedModel, precision: str, log) -> tuple[dict, dict]:
    """--precision q4|q8 on a model read in float: its linear layers quantized on the host
    (deploy/quantize/weight_only/schemes.py) -> (the fp32 state dict, the manifest's quantization extras)."""
    from deploy.quantize.weight_only import schemes

    scheme = schemes.get(precision)
    model = registry.get(m.arch)
    fp32 = dict(m.weights)
    t0 = time.perf_counter()
    done = schemes.quantize_linears(m.weights, model.linear_weights(m.config), scheme)
    model.plan_quantization(m.weights, m.config)
    log(f"{precision}: {len(done['quantized'])} linear layers quantized on the host like {scheme.like} (group 32, round to nearest"
        f"{', LM head 8-bit' if scheme.head_bits != scheme.bits else ''})"
        + (f"; {len(done['float'])} kept fp32 (inputs not a multiple of 32): {', '.join(done['float'][:3])}" if done["float"] else "")
        + f" ({time.perf_counter() - t0:.1f}s)")
    return fp32, {"precision": precision, "from": "fp32 weights, quantized on the host (round to nearest)",
                  "like": scheme.like, "head_bits": scheme.head_bits, "float_layers": done["float"]}


def _accuracy(m: LoadedModel, fp32_weights: dict, precision: str, executable, params: list, min_accuracy, accept, log) -> dict:
    from deploy.quantize.weight_only import accuracy, schemes

    # a module that does not run here is measured as its weights: the numpy pass on them dequantized
    deq = schemes.dequantized(m.weights, registry.get(m.arch).linear_weights(m.config)) if executable is None else None
    info = m.tokenizer_info
    return accuracy.report(m.arch, m.config, fp32_weights, deq, precision=precision,
                           executable=executable, params=params, tokenizer=m.tokenizer, bos_id=info["bos_id"],
                           add_bos=info["add_bos"], min_accuracy=min_accuracy, accept=accept, log=log)


def compile_decoder(
    model_path: str | Path,
    target: str | Preset,
    out: str | Path,
    *,
    name: str | None = None,
    context: int | None = None,
    precision: str | None = None,
    min_accuracy: float | None = None,
    accept_accuracy: bool = False,
    force: bool = False,
    sign: str | Path | None = None,
    decode_variants: tuple[int, ...] = (),
    matmul_activations: str = "fp32",
    kv_cache: str = "fp32",
    log=print,
) -> Path:
    """Compile a GGUF model, a Hugging Face checkpoint directory or an ONNX decoder with past key values
    (a .onnx file or optimum's output directory) into the decoder artifact `out`. `precision`: None (float
    inputs in fp32, GGUF files keep their quantization), "fp32", or "q4" / "q8" (weight-only, quantized on the host
    with an accuracy report; `min_accuracy` refuses to write below that top-1 agreement unless `accept_accuracy`). `decode_variants`:
    decode batch sizes also compiled with the batch bound (the device JIT's variants, shipped in the artifact:
    `edgejit compile` builds batch 1 unless told otherwise). `matmul_activations`: "int8" quantizes the
    activations of the matrix products on 4/8-bit weights (prefill, decode steps, the LM head) to int8
    per group where the target has int8 dot products (AVX-512 VNNI, AVX2, ARM dotprod: llama.cpp's Q4 x Q8
    route, edge/kernels/dense_int8act.py;
    `edgejit compile`'s default), "fp32" keeps them fp32 (logits as transformers' on the same weights). `kv_cache`: "fp32" or "fp16" (the KV cache's
    element type: half the memory and attention reads, keys and values rounded to fp16)."""
    import tvm

    preset = get_preset(target) if isinstance(target, str) else target
    signing_key = signing.load_private_key(sign) if sign else None
    ArtifactWriter.check_destination(out, force=force)
    preset.check_linker()
    model_path = Path(model_path)
    t0 = time.perf_counter()
    if matmul_activations not in kernels.MATMUL_ACTIVATIONS:
        raise EdgeJitError(f"--matmul-activations {matmul_activations}: expected {' or '.join(kernels.MATMUL_ACTIVATIONS)}")
    if kv_cache not in KV_CACHE_DTYPES:
        raise EdgeJitError(f"--kv-cache {kv_cache}: expected {' or '.join(KV_CACHE_DTYPES)}")
    if precision not in (None, "fp32", "q4", "q8"):
        raise EdgeJitError(f"--precision {precision}: a decoder is compiled in fp32 or weight-only q4 / q8")
    host_quant = precision in ("q4", "q8")
    bad = [n for n in decode_variants if not 1 <= n <= MAX_DECODE_BATCH]
    if bad:
        raise EdgeJitError(f"decode variant for {bad[0]} sequences: batch sizes are 1..{MAX_DECODE_BATCH}")
    if min_accuracy is not None and not host_quant:
        raise EdgeJitError("--min-accuracy applies to a decoder only with --precision q4 or q8 (its accuracy report)")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise EdgeJitError(f"--min-accuracy {min_accuracy} is not between 0 and 1 (a top-1 agreement)")
    fmt = input_format(model_path)
    if fmt == "gguf" and host_quant:
        f = GGUFFile(model_path)
        types = sorted({f.tensor_type(n) for n in f.tensors} - set(FLOAT_GGUF_TYPES))
        if types:
            raise EdgeJitError(f"--precision {precision}: {model_path.name} is already quantized ({', '.join(types)}) and keeps its "
                               "file's quantization: compile it without --precision (requantizing would add a second rounding)")
    if fmt == "gguf":
        m = load_gguf(model_path, log=log, quantized=precision is None)
    else:
        m = (load_hf if fmt == "hf" else load_onnx)(model_path, log=log)
    cfg = m.config
    fp32_weights, host_report = _host_quantize(m, precision, log) if host_quant else (None, None)
    trained = int(cfg.context_window_size)
    if context is not None and context > trained and getattr(cfg, "sliding_window", 0):
        raise EdgeJitError(f"--context {context} is longer than the model's sliding attention window ({cfg.sliding_window}): "
                           "edgejit does not implement sliding-window attention, so contexts stay within the window")
    if context is not None and not 1 <= context <= trained:
        raise EdgeJitError(f"--context {context} is outside 1..{trained} (the model's trained context)")
    default_context = context or min(trained, DEFAULT_CONTEXT)
    cfg.kv_cache_dtype = KV_CACHE_DTYPES[kv_cache]
    mod, names = export_module(m.arch, cfg, preset.target)
    mod = mod.with_attr(kernels.MATMUL_ACTIVATIONS_ATTR, matmul_activations)
    int8 = kernels.int8_matmuls(mod, preset.tvm_target())
    if cfg.quant and any(b != F16 for b in cfg.quant.values()):
        log(f"matmul activations: {f'int8 ({dense_int8act.INSTRUCTIONS[int8]})' if int8 else 'fp32'}"
            + ("" if int8 or matmul_activations == "fp32" else f" ({preset.name} has no int8 dot products)"))
    params = registry.get(m.arch).params(m.weights, cfg)
    missing = [n for n in names if n not in params]
    if missing:
        raise EdgeJitError(f"internal: no weights for {', '.join(missing[:3])}")
    module_json = tvm.ir.save_json(mod)
    config = dataclasses.asdict(cfg)
    with ArtifactWriter(out, force=force) as w:
        t1 = time.perf_counter()
        ex = pipeline.build(mod, preset.target)
        pipeline.export(ex, w.path("generic.so"), preset.target)
        log(f"built the generic module for {preset.name} ({time.perf_counter() - t1:.1f}s)")
        variants = {}
        for n in decode_variants:
            t1 = time.perf_counter()
            variants[n] = f"decode-b{n}.so"
            pipeline.export(pipeline.build(mod, preset.target, bind={"num_seqs": n}), w.path(variants[n]), preset.target)
            log(f"built the decode step of {n} sequence(s) for {preset.name} ({time.perf_counter() - t1:.1f}s)")
        accuracy = None
        if host_quant:
            accuracy = _accuracy(m, fp32_weights, precision, ex if preset.runs_here() else None, [params[n] for n in names],
                                 min_accuracy, accept_accuracy, log)
        w.write_text("module.json", module_json)
        w.write_params([params[n] for n in names])
        m.tokenizer.save(str(w.path("tokenizer.json")))
        template = m.tokenizer_info.get("chat_template")
        if template:
            w.write_text("chat_template.jinja", template)
        info = m.tokenizer_info
        weight_bytes = sum(int(params[n].nbytes) for n in names)
        decoder = DecoderInfo(
            architecture=m.arch, config=config, context_length=trained, default_context=default_context,
            prefill_chunk=min(PREFILL_CHUNK, default_context), kv_bytes_per_token=kv_bytes_per_token(config),
            weight_bytes=weight_bytes, param_names=names,
            tokenizer=TokenizerInfo("tokenizer.json", info["kind"], info["bos_id"], info["eos_id"], info["stop_ids"],
                                    info["add_bos"], info["bos_token"], info["eos_token"]),
            chat_template="chat_template.jinja" if template else None, source=m.source, variants=variants,
        )
        manifest = Manifest(
            kind="decoder",
            decoder=decoder,
            model=ModelInfo(name or (model_path.name if model_path.is_dir() else model_path.stem), m.sha256, model_path.name),
            inputs=[TensorSpec("input_ids", "int32", ("num_tokens",), (0, cfg.vocab_size - 1))],
            outputs=[TensorSpec("logits", "float32", ("num_seqs", cfg.vocab_size))],
            # The JIT specializes decode steps by the number of sequences decoded together.
            seq_dim="num_seqs",
            dims={"num_seqs": DimRange(1, MAX_DECODE_BATCH), "num_tokens": DimRange(1, trained)},
            precision=_precision(cfg),
            quantization=_quantization(cfg, host_report, int8),
            accuracy=accuracy,
            **build_fields(preset),
        )
        w.commit(manifest, signing_key=signing_key, log=log)
    kv_mib = decoder.kv_bytes_per_token * default_context / 2**20
    log(f"wrote {out}: weights {weight_bytes / 2**20:.0f} MiB, KV cache ({kv_cache}) {decoder.kv_bytes_per_token / 1024:.1f} KiB per token "
        f"({kv_mib:.0f} MiB for the default context of {default_context}) ({time.perf_counter() - t0:.1f}s in all)")
    return Path(out)
