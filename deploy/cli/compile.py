"""`edgejit compile`: command-line front of deploy.compiler.driver (ONNX tensor models) and
deploy.compiler.decoder (GGUF files, Hugging Face checkpoint directories, ONNX decoders with past key values)."""

from __future__ import annotations

from edge.errors import EdgeJitError

from deploy.compiler.driver import compile_model


def add_arguments(p) -> None:
    p.add_argument("model", help="ONNX model file (external data next to it is read too), or for text generation a GGUF "
                   "file, a Hugging Face checkpoint directory, or an ONNX decoder with past key values (the .onnx or optimum's "
                   "output directory)")
    p.add_argument("--target", "-t", default="host", help="target preset (see `edgejit targets`; default: host)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--name", help="model name in the manifest (default: the file's stem)")
    p.add_argument("--precision", choices=["fp32", "int8", "q4", "q8"],
                   help="ONNX tensor models: fp32 (default) or int8. Decoders (Hugging Face directories, ONNX decoders with past, "
                        "float GGUF files): fp32 (default), q8 (8-bit weights, like Q8_0) or q4 (4-bit weights like Q4_1, LM head 8-bit), "
                        "quantized per group of 32 with an accuracy report (docs/generation.md#quantization). A quantized GGUF "
                        "keeps its file's quantization (Q8_0/Q4_0/Q4_1 exactly, other types requantized to 4/8 bits); fp32 dequantizes all")
    p.add_argument("--context", type=int, help="GGUF / Hugging Face directory: context the runtime allocates by default "
                   "(default: the model's, at most 4096)")
    p.add_argument("--decode-variants", metavar="N,N,...", help="decoders: decode batch sizes (sequences decoded "
                   "together) compiled into the artifact, so the device decodes them on specialized code from the first "
                   "token instead of waiting for its JIT (default: 1; 'none': leave them all to the JIT)")
    p.add_argument("--matmul-activations", "--decode-activations", dest="matmul_activations", choices=["int8", "fp32"],
                   help="decoders with 4/8-bit weights: int8 (default) quantizes the activations of their matrix products "
                   "(prefill, decode steps, the LM head) per group of 32 on targets with AVX-512 VNNI and multiplies them with "
                   "vpdpbusd (llama.cpp's Q4 x Q8: 2.5x faster prefill, faster decode, logits within ~2-3%% of fp32 "
                   "activations; docs/generation.md); fp32 keeps fp32 activations everywhere (logits as transformers' on the same weights). "
                   "Other targets always run fp32 activations")
    p.add_argument("--kv-cache", choices=["fp16", "fp32"], help="decoders: the KV cache's element type. fp16 (default, "
                   "llama.cpp's default cache type too): half the memory per token of context and half the bytes attention reads, "
                   "keys, values and queries rounded to fp16 (logits within ~1e-3 of fp32's); fp32 keeps them exact "
                   "(docs/generation.md#memory)")
    p.add_argument("--max-seq", type=int, help="longest sequence the artifact accepts (default: the model's position-embedding rows, at most 512)")
    p.add_argument("--seq-dim", help="name of the symbolic sequence dim (default: dim 1 of the first input)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.add_argument("--sign", metavar="KEY", help="sign the artifact with this private key (see `edgejit keygen`)")
    q = p.add_argument_group("int8 (see docs/int8.md)")
    q.add_argument("--calibrate", metavar="FILE", help="sample inputs: .npz (arrays named as the inputs) or .txt (texts, tokenizer.json next to the model)")
    q.add_argument("--activations", choices=["dynamic", "static"], default="dynamic",
                   help="activation scales: per token at run time (default) or per tensor from --calibrate")
    q.add_argument("--keep-float", metavar="OPS", help="comma-separated ops kept in float: categories "
                   "(embeddings, layernorm, softmax, head) and/or weight-name globs (default: embeddings,layernorm,softmax,head)")
    q.add_argument("--min-accuracy", type=float, help="threshold of the accuracy report (encoder: mean cosine, default 0.99; "
                   "decoder: top-1 agreement, default 0.90; q4/q8 decoders: top-1 agreement with fp32, no default)")
    q.add_argument("--accept-accuracy", action="store_true", help="write the artifact even when accuracy is below the threshold")
    t = p.add_argument_group("tuning (see docs/kernels.md)")
    t.add_argument("--tune", type=int, metavar="TRIALS", help="tune with MetaSchedule: TRIALS measured candidates per "
                   "sequence length; the records ship in the artifact and the device's JIT applies them")
    t.add_argument("--tune-lengths", metavar="N,N,...", help="sequence lengths to tune, batch 1 "
                   "(default: 16,32,64,128,256 up to --max-seq)")
    t.add_argument("--tune-dir", metavar="DIR", help="where the search state is kept for resuming "
                   "(default: ~/.cache/edgejit/tuning/<module+target key>)")


ONNX_ONLY = ("max_seq", "seq_dim", "calibrate", "keep_float", "min_accuracy", "tune", "tune_lengths", "tune_dir")


def _is_gguf(path: str) -> bool:
    """GGUF magic, or a .gguf name (the GGUF reader then says what is wrong with the file)."""
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _decode_variants(text: str | None) -> tuple[int, ...]:
    if text is None:
        return (1,)
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    except ValueError:
        raise EdgeJitError(f"--decode-variants {text}: expected batch sizes like 1,2,4 or 'none'") from None
    if not sizes or min(sizes) < 1:
        raise EdgeJitError(f"--decode-variants {text}: batch sizes are 1 or more")
    return sizes


def main(args) -> int:
    import os

    from deploy.frontends.onnx.decoder import kind as graph_kind

    onnx_kind = "" if os.path.isdir(args.model) or _is_gguf(args.model) else graph_kind(args.model)
    if os.path.isdir(args.model) or _is_gguf(args.model) or onnx_kind == "with_past":
        from deploy.compiler.decoder import compile_decoder

        weight_only = args.precision in ("q4", "q8")
        # --min-accuracy: compile_decoder says when it applies (q4/q8)
        given = [o for o in ONNX_ONLY if getattr(args, o) is not None and o != "min_accuracy"]
        what = "Hugging Face checkpoints" if os.path.isdir(args.model) else "GGUF files" if not onnx_kind \
            else "ONNX decoders with past key values"
        if args.precision == "int8":
            raise EdgeJitError(f"--precision int8 applies to ONNX tensor models, not to {what} (text generation: fp32, q4 or q8)")
        if given:
            raise EdgeJitError(f"--{given[0].replace('_', '-')} applies to ONNX models, not to {what}")
        if args.accept_accuracy and not weight_only:
            raise EdgeJitError("--accept-accuracy applies to int8 ONNX models and q4/q8 decoders")
        compile_decoder(args.model, args.target, args.output, name=args.name, context=args.context,
                        precision=args.precision, min_accuracy=args.min_accuracy, accept_accuracy=args.accept_accuracy,
                        force=args.force, sign=args.sign, decode_variants=_decode_variants(args.decode_variants),
                        matmul_activations=args.matmul_activations or "int8", kv_cache=args.kv_cache or "fp16")
        return 0
    for opt in ("decode_variants", "matmul_activations", "kv_cache"):
        if getattr(args, opt) is not None:
            raise EdgeJitError(f"--{opt.replace('_', '-')} applies to decoders (text generation), not to ONNX tensor models")
    if args.precision in ("q4", "q8"):
        raise EdgeJitError(f"--precision {args.precision} applies to decoders (GGUF files, Hugging Face checkpoint directories, "
                           "ONNX decoders with past key values); ONNX tensor models take fp32 or int8")
    if args.context is not None:
        raise EdgeJitError("--context applies to GGUF models, Hugging Face checkpoint directories and ONNX decoders with past "
                           "key values (text generation)")
    compile_model(
        args.model, args.target, args.output, name=args.name, precision=args.precision or "fp32",
        max_seq=args.max_seq, seq_dim=args.seq_dim, force=args.force, sign=args.sign,
        calibrate=args.calibrate, activations=args.activations,
        keep_float=None if args.keep_float is None else args.keep_float.split(","),
        min_accuracy=args.min_accuracy, accept_accuracy=args.accept_accuracy,
        tune=args.tune, tune_lengths=args.tune_lengths, tune_dir=args.tune_dir,
    )
    if onnx_kind == "without_past":
        print(f"note: {os.path.basename(args.model)} has no past_key_values inputs: compiled as a tensor model (input_ids -> "
              "logits at every position, `edgejit run`), not for text generation; export it with past key values "
              "(optimum: --task text-generation-with-past) to generate with a KV cache (docs/models.md)")
    return 0
