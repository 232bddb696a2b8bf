"""The int8 steps of `edgejit compile`: quantization options and samples before the rewrite, the
accuracy report after the build (scheme.py, calibrate.py, accuracy.py do the work)."""

from __future__ import annotations

import time

from edge.artifact.targets import host_preset
from edge.runtime.module import flatten_outputs

from deploy.quantize.int8 import accuracy, calibrate
from deploy.quantize.int8.scheme import DEFAULT_KEEP_FLOAT, QuantOptions, QuantizeError

# The spec reference (onnx.reference) needs ~1 s per MiniLM-sized sample: the accuracy report uses
# the first 16 samples (calibration ranges use all of them, up to 64).
ACCURACY_SAMPLES = 16


def options(mod, params, inputs, *, model_path, calibrate_file=None, activations="dynamic", keep_float=None,
            min_accuracy=None, max_seq=512, log=print) -> tuple[QuantOptions, list[dict]]:
    """QuantOptions for quantize.quantize plus the sample inputs (calibration data, or synthetic)."""
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise QuantizeError(f"--min-accuracy {min_accuracy} is not between 0 and 1 (a cosine or a top-1 agreement)")
    if activations not in ("dynamic", "static"):
        raise QuantizeError(f"unknown --activations '{activations}' (dynamic or static)")
    if activations == "static" and not calibrate_file:
        raise QuantizeError("--activations static needs calibration data (--calibrate FILE)")
    keep = tuple(DEFAULT_KEEP_FLOAT if keep_float is None else [k.strip() for k in keep_float if k.strip()])
    if calibrate_file:
        samples = calibrate.load_samples(calibrate_file, inputs, model_path=model_path, max_seq=max_seq)
        log(f"calibration: {len(samples)} samples from {calibrate_file}")
    else:
        samples = calibrate.synthetic_samples(inputs)
    opts = QuantOptions(activations=activations, keep_float=keep)
    if activations == "static":
        t0 = time.perf_counter()
        target = host_preset().target
        names = [s.name for s in inputs]

        runner = {}

        def build_and_run(inst, p, arrays):
            if "r" not in runner:
                runner["r"] = accuracy.HostRunner(inst, p, target)
            return runner["r"](arrays)

        opts.ranges = calibrate.activation_ranges(mod, params, samples, names, build_and_run)
        log(f"calibration: static ranges of {len(opts.ranges)} activations ({time.perf_counter() - t0:.1f}s)")
    return opts, samples


def accuracy_report(model, inputs, outputs, samples, *, executable, runs_here: bool, prepare_for_host, params,
                    min_accuracy=None, accept=False, log=print) -> dict:
    """Compare the int8 module with the spec reference on `samples`; raises AccuracyError below
    the threshold unless `accept`. A module for a foreign target is measured through the same
    rewrite built for this host (the int32 arithmetic is exact on every target)."""
    import tvm
    from tvm import relax

    t0 = time.perf_counter()
    samples = samples[:ACCURACY_SAMPLES]
    names = [s.name for s in inputs]
    if runs_here:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        dev_params = [tvm.runtime.tensor(p) for p in params]

        def run(arrays):
            return flatten_outputs(vm["main"](*[tvm.runtime.tensor(a) for a in arrays], *dev_params))
        measured_on = "target module"
    else:
        hmod, hparams, htarget = prepare_for_host()
        run = accuracy.HostRunner(hmod, hparams, htarget)
        measured_on = "host build of the same rewrite"
    got = [run([s[n] for n in names]) for s in samples]
    ref = accuracy.reference_outputs(model, samples)
    report = accuracy.compare(accuracy.model_kind(outputs, inputs), samples, ref, got)
    report["reference"] = "onnx.reference (fp32)"
    report["measured_on"] = measured_on
    report["sample_lengths"] = sorted({int(s[names[0]].shape[1]) for s in samples if s[names[0]].ndim >= 2})
    accuracy.check(report, min_accuracy, accept)
    log(f"int8 accuracy ({report['kind']}, {len(samples)} samples): {report['metric']} {report['value']:.4f} "
        f"(threshold {report['threshold']:.2f}{', BELOW, accepted' if report['below_threshold'] else ''}; {time.perf_counter() - t0:.1f}s)")
    return report
