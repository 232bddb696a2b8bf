"""Sample inputs for int8: reading calibration data, synthetic samples, static activation ranges.

Calibration data (`compile --calibrate FILE`):
- `.npz`: one array per model input, named as the inputs, with the model's dtypes and ranks;
  the first (batch) axis holds the samples. Read with allow_pickle=False.
- `.txt`: one text per line, tokenized with the `tokenizer.json` next to the model (the
  `tokenizers` package); `input_ids` from the tokenizer, `attention_mask` ones, `token_type_ids`
  zeros, `position_ids` 0..n-1.
Every sample is returned as a dict of batch-1 arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.artifact.reader import TensorSpec

from deploy.quantize.int8.scheme import QuantizeError
from edge.runtime.samples import sample_inputs, single_batch_dims


class CalibrationError(QuantizeError):
    """Calibration data that does not fit the model."""


def load_samples(path, inputs: list[TensorSpec], *, model_path=None, max_seq: int = 512, limit: int = 64) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path}: no such file")
    if path.suffix == ".npz":
        samples = _from_npz(path, inputs, max_seq)
    elif path.suffix == ".txt":
        samples = _from_text(path, inputs, model_path, max_seq)
    else:
        raise CalibrationError(f"calibration file {path.name}: use .npz (arrays named as the inputs) or .txt (one text per line)")
    return samples[:limit]


def _from_npz(path: Path, inputs: list[TensorSpec], max_seq: int) -> list[dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise CalibrationError(f"calibration file {path.name}: not a readable .npz ({type(e).__name__})") from None
    names = [s.name for s in inputs]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CalibrationError(f"calibration file {path.name}: unknown input '{unknown[0]}' (the model takes: {', '.join(names)})")
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(f"calibration file {path.name}: missing input '{missing[0]}' (the model takes: {', '.join(names)})")
    batch = None
    for spec in inputs:
        a = data[spec.name]
        if str(a.dtype) != spec.dtype:
            raise CalibrationError(f"calibration input '{spec.name}' is {a.dtype}, the model takes {spec.dtype}")
        if a.ndim != len(spec.shape):
            raise CalibrationError(f"calibration input '{spec.name}' has {a.ndim} dims {list(a.shape)}, the model takes {len(spec.shape)} {list(spec.shape)}")
        for i, (got, want) in enumerate(zip(a.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise CalibrationError(f"calibration input '{spec.name}' has shape {list(a.shape)}, the model takes {list(spec.shape)} (dim {i})")
        if a.size == 0:
            raise CalibrationError(f"calibration data is empty ('{spec.name}' has shape {list(a.shape)})")
        if a.ndim >= 2 and a.shape[1] > max_seq:
            raise CalibrationError(f"calibration input '{spec.name}' has {a.shape[1]} positions, more than --max-seq {max_seq}")
        if spec.range and np.issubdtype(a.dtype, np.integer) and (a.min() < spec.range[0] or a.max() > spec.range[1]):
            raise CalibrationError(f"calibration input '{spec.name}' has values outside [{spec.range[0]}, {spec.range[1]}]")
        if batch is not None and a.shape[0] != batch:
            raise CalibrationError(f"calibration inputs disagree on the number of samples ({batch} vs {a.shape[0]} in '{spec.name}')")
        batch = a.shape[0]
    if not batch:
        raise CalibrationError("calibration data is empty")
    return [{n: data[n][i:i + 1] for n in names} for i in range(batch)]


def _from_text(path: Path, inputs: list[TensorSpec], model_path, max_seq: int) -> list[dict]:
    texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration file {path.name} is empty (want one text per line)")
    tok_path = Path(model_path).parent / "tokenizer.json" if model_path else None
    if tok_path is None or not tok_path.is_file():
        raise CalibrationError(f"text calibration needs a tokenizer.json next to the model (looked for {tok_path})")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    samples = []
    for t in texts:
        ids = tok.encode(t).ids[:max_seq]
        if not ids:
            continue
        n = len(ids)
        sample = {}
        for spec in inputs:
            if spec.name == "input_ids":
                v = np.array([ids])
            elif "mask" in spec.name:
                v = np.ones((1, n))
            elif "type" in spec.name:
                v = np.zeros((1, n))
            elif "position" in spec.name:
                v = np.arange(n)[None]
            else:
                raise CalibrationError(f"text calibration cannot fill input '{spec.name}' (pass an .npz)")
            sample[spec.name] = v.astype(spec.dtype)
        samples.append(sample)
    if not samples:
        raise CalibrationError(f"calibration file {path.name}: no text produced tokens")
    return samples


def synthetic_samples(inputs: list[TensorSpec], *, lengths=(8, 16, 32, 64), seed: int = 0) -> list[dict]:
    """Random token ids (within each input's range) when there is no calibration data."""
    return [sample_inputs(inputs, single_batch_dims(inputs, n), seed=seed + i) for i, n in enumerate(lengths)]


def activation_ranges(mod, params, samples: list[dict], input_names: list[str], build_and_run) -> dict[str, float]:
    """max |x| over the samples for every quantizable matmul input x (keyed as quantize.Site.site).

    The float module is instrumented to also return max|x| of each site; `build_and_run(mod, params,
    sample)` compiles it for this host and returns its outputs.
    """
    from tvm import relax

    from deploy.quantize.int8.scheme import find_sites

    sites, _ = find_sites(mod, params)
    if not sites:
        return {}
    main = mod["main"]
    site_names, xs = [], []
    for s in sites:
        if s.site not in site_names:
            site_names.append(s.site)
            xs.append(s.x)
    blocks = list(main.body.blocks)
    extra = []
    stats = []
    for i, x in enumerate(xs):
        v = relax.Var(f"calib_absmax_{i}", relax.TensorType([], "float32"))
        extra.append(relax.VarBinding(v, relax.op.max(relax.op.abs(x))))
        stats.append(v)
    last = blocks[-1]
    blocks[-1] = relax.DataflowBlock(list(last.bindings) + extra) if isinstance(last, relax.DataflowBlock) else relax.BindingBlock(list(last.bindings) + extra)
    out = relax.Var("calib_out", relax.TupleType([main.ret_ty, *[relax.TensorType([], "float32") for _ in stats]]))
    body = relax.SeqExpr(blocks + [relax.BindingBlock([relax.VarBinding(out, relax.Tuple([main.body.body, *stats]))])], out)
    ret = relax.TupleType([main.ret_ty, *[relax.TensorType([], "float32") for _ in stats]])
    func = relax.Function(main.params, body, ret, main.is_pure, main.attrs)
    inst = relax.transform.Normalize()(_with_main(mod, func))
    amax = dict.fromkeys(site_names, 0.0)
    for sample in samples:
        outs = build_and_run(inst, params, [sample[n] for n in input_names])
        for name, v in zip(site_names, outs[-len(stats):]):
            amax[name] = max(amax[name], float(np.asarray(v)))
    return amax


def _with_main(mod, func):
    import tvm

    funcs = {gv.name_hint: f for gv, f in mod.functions.items()}
    funcs["main"] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
