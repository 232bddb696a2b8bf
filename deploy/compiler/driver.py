"""The ONNX compile driver (`edgejit compile`): model file -> ONNX frontend -> host-side preparation
(int8, weight packing) -> build for the target preset -> artifact (artifact_writer.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from edge.artifact.manifest import DimRange, Manifest, ModelInfo, TensorSpec, TuningInfo
from edge.artifact.reader import sha256_file
from edge.artifact.targets import Preset, get_preset
from edge.errors import EdgeJitError, ModelError
from edge.runtime import pipeline as edge_build
from edge.runtime import tuning_records as edge_tuning

from deploy.compiler import signing, tuner
from deploy.compiler.artifact_writer import ArtifactWriter, build_fields
from deploy.compiler.padding_check import check_padding
from deploy.compiler.prepare import prepare
from deploy.frontends.onnx import importer as onnx_import, prequant
from deploy.quantize.int8 import build_options as int8_build
from deploy.quantize.int8.scheme import NothingToQuantize


def _dims_of(ty) -> tuple:
    from tvm import tirx

    dims = []
    for d in ty.shape.values:
        dims.append(int(d) if isinstance(d, tirx.IntImm) else str(d))
    return tuple(dims)


def _dtype(ty) -> str:
    return str(ty.dtype)


def signature(mod, input_names: list[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from tvm import relax

    main = mod["main"]
    n = int(main.attrs["num_input"])
    inputs = [
        TensorSpec(name, _dtype(p.ty), _dims_of(p.ty))
        for name, p in zip(input_names, main.params[:n])
    ]
    ret = main.ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    outputs = [TensorSpec(f"output_{i}", _dtype(s), _dims_of(s)) for i, s in enumerate(fields)]
    return inputs, outputs


_VALUE_PRESERVING = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def index_ranges(model) -> dict[str, tuple[int, int]]:
    """Inputs used as indices into a weight table (token ids into embeddings) and their valid range.
    The compiled Gather does not bounds-check, so the runtime must."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    tables = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) >= 1}
    ranges = {}
    for inp in model.graph.input:
        frontier, seen, limits = [inp.name], set(), []
        while frontier:
            name = frontier.pop()
            for node, pos in consumers.get(name, []):
                if node.op_type == "Gather" and pos == 1 and node.input[0] in tables:
                    limits.append(tables[node.input[0]])
                elif node.op_type in _VALUE_PRESERVING and pos == 0 and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])
        if limits:
            ranges[inp.name] = (0, min(limits) - 1)
    return ranges


DEFAULT_MAX_SEQ = 512


def position_table_rows(model) -> int | None:
    """Rows of the learned position-embedding table (BERT's position_embeddings, GPT-2's wpe), if any:
    longer sequences would index past it (gathers clamp, so the results would be silently wrong)."""
    rows = [t.dims[0] for t in model.graph.initializer
            if len(t.dims) == 2 and ("position_embedding" in t.name.lower() or t.name.lower().endswith("wpe.weight"))]
    return min(rows) if rows else None


def find_seq_dim(inputs: list[TensorSpec], requested: str | None) -> str:
    symbolic = [d for s in inputs for d in s.shape if isinstance(d, str)]
    if requested:
        if requested not in symbolic:
            raise ModelError(f"--seq-dim '{requested}' is not a symbolic input dim (have: {', '.join(dict.fromkeys(symbolic)) or 'none'})")
        return requested
    for s in inputs:
        if len(s.shape) >= 2 and isinstance(s.shape[1], str):
            return s.shape[1]
    raise ModelError("no symbolic sequence dimension on the inputs (export the model with a dynamic sequence axis, or pass --seq-dim)")


def compile_model(
    model_path: str | Path,
    target: str | Preset,
    out: str | Path,
    *,
    name: str | None = None,
    precision: str = "fp32",
    max_seq: int | None = None,
    seq_dim: str | None = None,
    force: bool = False,
    sign: str | Path | None = None,
    calibrate: str | Path | None = None,
    activations: str = "dynamic",
    keep_float: list[str] | None = None,
    min_accuracy: float | None = None,
    accept_accuracy: bool = False,
    tune: int | None = None,
    tune_lengths: str | None = None,
    tune_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Compile `model_path` into the artifact directory `out`; with `sign` (a private key file from
    `edgejit keygen`), the manifest is signed and the signature written as manifest.sig."""
    preset = get_preset(target) if isinstance(target, str) else target
    signing_key = signing.load_private_key(sign) if sign else None  # fail before the long compile
    out = Path(out)
    ArtifactWriter.check_destination(out, force=force)
    if preset.linker and shutil.which(preset.linker) is None:
        raise EdgeJitError(
            f"target {preset.name} needs the aarch64 linker '{preset.linker}': install the Debian package gcc-aarch64-linux-gnu"
        )
    if tune is not None:
        tuner.preflight(preset, tune)
    model_path = Path(model_path)
    t0 = time.perf_counter()
    model = onnx_import.load(model_path)
    input_names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    float_model, exact_weights, prequantized = prequant.lower(model)
    if prequantized:
        log(f"pre-quantized model lowered to float matmuls + its int8 weights: {prequantized}")
    mod, params = onnx_import.to_relax(float_model)
    inputs, outputs = signature(mod, input_names)
    seq = find_seq_dim(inputs, seq_dim)
    ranges = index_ranges(model)
    inputs = [TensorSpec(s.name, s.dtype, s.shape, ranges.get(s.name)) for s in inputs]
    positions = position_table_rows(model)
    if max_seq is None:
        max_seq = min(positions or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
    elif positions and max_seq > positions:
        raise EdgeJitError(f"--max-seq {max_seq} is longer than the model's {positions} position embeddings")
    output_names = [o.name for o in model.graph.output]
    if len(output_names) == len(outputs):
        outputs = [TensorSpec(n, o.dtype, o.shape) for n, o in zip(output_names, outputs)]
    log(f"imported {model_path.name}: {len(inputs)} inputs, {len(outputs)} outputs, {len(params)} weights ({time.perf_counter() - t0:.1f}s)")

    quant, quant_samples, float_mod, float_params = None, None, mod, params
    if precision == "int8":
        # int8 options: see deploy/quantize/int8/build_options.py and docs/int8.md
        quant, quant_samples = int8_build.options(
            mod, params, inputs, model_path=model_path, calibrate_file=calibrate, activations=activations,
            keep_float=keep_float, min_accuracy=min_accuracy, max_seq=max_seq, log=log,
        )
        quant.exact = exact_weights
        try:
            mod, params = prepare(mod, params, preset.tvm_target(), precision=precision, quant=quant)
            log(f"int8: {quant.report['quantized']} matmuls quantized ({quant.report['isa']}), {len(quant.report['float'])} kept in float")
        except NothingToQuantize as e:
            log(f"warning: {e}; keeping fp32")
            precision, quant = "fp32", None
    if precision != "int8":
        mod, params = prepare(mod, params, preset.tvm_target(), precision=precision)
    padding = check_padding(model_path, inputs, outputs, seq)
    symbolic = list(dict.fromkeys(d for s in inputs for d in s.shape if isinstance(d, str)))
    import tvm

    module_json = tvm.ir.save_json(mod)
    tuning_doc = None
    if tune is not None:
        tuning_doc = tuner.tune(
            mod, params, preset, dims=symbolic, seq_dim=seq, lengths=tuner.parse_lengths(tune_lengths, max_seq),
            trials=tune, work_dir=Path(tune_dir) if tune_dir else tuner.default_dir(module_json, preset.target),
            inputs=inputs, log=log,
        )

    with ArtifactWriter(out, force=force) as writer:
        t1 = time.perf_counter()
        ex = edge_build.build(mod, preset.target)
        edge_build.export(ex, writer.path("generic.so"), preset.target)
        log(f"built generic module for {preset.name} ({time.perf_counter() - t1:.1f}s)")
        accuracy_report = None
        if quant is not None:
            def prepare_for_host():
                host = get_preset("host")
                host_quant = dataclasses.replace(quant, report={})  # keep the target's report
                return (*prepare(float_mod, float_params, host.tvm_target(), precision="int8", quant=host_quant), host.target)

            accuracy_report = int8_build.accuracy_report(
                float_model, inputs, outputs, quant_samples, executable=ex, runs_here=preset.runs_here(),
                prepare_for_host=prepare_for_host, params=params, min_accuracy=min_accuracy,
                accept=accept_accuracy, log=log,
            )
            if prequantized:
                accuracy_report["reference"] = "onnx.reference of the model with its int8 weights dequantized (fp32)"
        writer.write_text("module.json", module_json)
        writer.write_params(params)
        tokenizer = model_path.with_name("tokenizer.json")
        if tokenizer.is_file():  # the model's tokenizer beside it (edgejit example, HF exports): /v1/embeddings reads it
            shutil.copyfile(tokenizer, writer.path("tokenizer.json"))
            log(f"shipping {tokenizer} in the artifact (checksummed with the rest)")
        if tuning_doc is not None:
            writer.write_text(edge_tuning.FILE, json.dumps(tuning_doc) + "\n")
        manifest = Manifest(
            model=ModelInfo(name or model_path.stem, sha256_file(model_path), model_path.name),
            inputs=inputs,
            outputs=outputs,
            seq_dim=seq,
            dims={d: DimRange(1, max_seq if d == seq else None) for d in symbolic},
            padding=padding,
            precision=precision,
            quantization={**quant.report, **({"prequantized": prequantized} if prequantized else {})} if quant is not None else None,
            accuracy=accuracy_report,
            tuning=TuningInfo(edge_tuning.FILE, tune, [int(n) for n in tuning_doc["lengths"]], len(tuning_doc["records"]))
            if tuning_doc is not None else None,
            **build_fields(preset),
        )
        writer.commit(manifest, signing_key=signing_key, log=log)
    log(f"wrote {out} ({time.perf_counter() - t0:.1f}s in all)")
    return out
