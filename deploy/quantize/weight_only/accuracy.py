"""What --precision q4|q8 costs a decoder, measured at compile time on real text: teacher-forced
next-token logits of the fp32 weights and of the quantized model over one sequence of Debian
fortunes (deploy/tools/corpus.py), compared as top-1 agreement (the two argmaxes equal at each
position) and as perplexity of each on the text (and their ratio).

The fp32 side is the numpy forward pass of the model definitions' math
(deploy/frontends/onnx/decoder/reference.py) on the weights as read; the quantized side is the
compiled module itself when the target runs on this machine (so the kernels are in the measure),
else the same numpy pass on the dequantized weights (a cross-compile).
"""

from __future__ import annotations

import time

import numpy as np

from edge.errors import EdgeJitError

CORPUS_TOKENS = 256  # a few hundred tokens: ~1 s per side for SmolLM2-135M
CORPUS_SEED = 0


class AccuracyError(EdgeJitError):
    """The quantized decoder's top-1 agreement is below --min-accuracy."""


def corpus_ids(tokenizer, bos_id: int | None, add_bos: bool, n: int) -> list[int]:
    """n tokens of fortunes picked with a fixed seed, separated by blank lines (BOS first when the
    model's tokenizer adds one)."""
    from tokenizers import Tokenizer

    from deploy.tools import corpus

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy without padding or truncation
    tok.no_padding()
    tok.no_truncation()
    texts = corpus.sentences()
    order = np.random.default_rng(CORPUS_SEED).permutation(len(texts))
    ids = [int(bos_id)] if add_bos and bos_id is not None else []
    for i in order:
        ids += tok.encode(texts[i] + "\n\n", add_special_tokens=False).ids
        if len(ids) >= n:
            break
    return ids[:n]


def reference_logits(arch: str, cfg, weights: dict, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] from the numpy forward pass of `weights` (a float state dict)."""
    from deploy.frontends.onnx.decoder import reference

    if arch == "gpt2":
        return reference.gpt2_logits(cfg, weights, ids)
    from deploy.models.llama.loader import rope_inv_freq

    return reference.llama_logits(cfg, weights, ids, rope_inv_freq(cfg, weights.get("rope_freqs")))


def module_logits(executable, params: list[np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] from the compiled decoder (prefill of the whole sequence, logits at every position)."""
    import tvm

    from edge.generate.decoder import Decoder

    dec = Decoder(executable, [tvm.runtime.tensor(np.require(p, requirements="C")) for p in params], config,
                  context=len(ids), max_batch=1, prefill_chunk=len(ids))
    dec.add_sequence(0)
    return dec.score(0, ids)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given the logits before each."""
    nll = -_log_softmax(logits[:-1])[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    ppl_ref, ppl_got = perplexity(ref, ids), perplexity(got, ids)
    return {"kind": "decoder", "metric": "top1_agreement", "value": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "perplexity": {"fp32": ppl_ref, "quantized": ppl_got, "ratio": ppl_got / ppl_ref}, "tokens": len(ids),
            "max_abs_logit_diff": float(np.abs(ref - got).max())}


def report(arch: str, cfg, fp32_weights: dict, dequantized_weights: dict, *, precision: str, executable=None,
           params: list[np.ndarray] | None = None, tokenizer, bos_id, add_bos: bool, min_accuracy: float | None = None,
           accept: bool = False, log=print) -> dict:
    """The manifest's `accuracy` entry for a weight-only quantized decoder. `executable` and
    `params` (the compiled module and its parameters) when it runs on this machine."""
    import dataclasses

    t0 = time.perf_counter()
    n = min(CORPUS_TOKENS, int(cfg.context_window_size))
    ids = corpus_ids(tokenizer, bos_id, add_bos, n)
    ref = reference_logits(arch, cfg, fp32_weights, ids)
    if executable is not None:
        got = module_logits(executable, params, dataclasses.asdict(cfg), ids)
        measured_on = "the compiled module (this machine)"
    else:
        got = reference_logits(arch, cfg, dequantized_weights, ids)
        measured_on = "numpy forward pass of the dequantized weights (the target does not run here)"
    r = compare(ref, got, ids)
    r |= {"precision": precision, "corpus": f"Debian fortunes (deploy/tools/corpus.py), seed {CORPUS_SEED}, one sequence",
          "reference": "numpy forward pass of the fp32 weights (deploy/frontends/onnx/decoder/reference.py)",
          "measured_on": measured_on}
    ppl = r["perplexity"]
    log(f"{precision} accuracy on {len(ids)} tokens of real text: top-1 agreement with fp32 {r['value']:.4f}, perplexity "
        f"{ppl['quantized']:.3f} vs fp32 {ppl['fp32']:.3f} (x{ppl['ratio']:.4f}) ({time.perf_counter() - t0:.1f}s)")
    if min_accuracy is not None:
        r["threshold"] = float(min_accuracy)
        r["below_threshold"] = bool(r["value"] < min_accuracy)
        if r["below_threshold"] and not accept:
            raise AccuracyError(f"{precision} accuracy below threshold: top-1 agreement {r['value']:.4f} < {min_accuracy:.4f}; "
                                "use a wider precision (q8), lower --min-accuracy, or pass --accept-accuracy to write it anyway")
    return r
