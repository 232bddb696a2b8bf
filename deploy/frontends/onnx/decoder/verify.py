"""The compile-time check that the weights read out of the graph are the graph's model: ONNX Runtime
runs the original graph on a short prompt (empty past) and one more token with the past it
returned; the numpy reference (reference.py) runs the mapped weights; their logits must agree."""

from __future__ import annotations

import numpy as np

from edge.errors import ModelError

PROMPT_TOKENS = 7
TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float16): 3e-2}  # |graph - ours| / max |graph logit|


def _prompt(vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(0, vocab, PROMPT_TOKENS)]


def check(graph, arch: str, cfg, weights: dict, log=print) -> dict:
    """-> {"prompt_tokens", "decode_steps", "max_rel_diff", "onnxruntime"}; ModelError when they differ."""
    import onnxruntime as ort

    from deploy.frontends.onnx.decoder import reference

    layers, kv_heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = graph.dtype_of("past_key_values.0.key")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(graph.path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{graph.name}: ONNX Runtime cannot load the graph to check the weights read from it: "
                         f"{str(e).splitlines()[0][:300]}") from None
    names = {i.name for i in sess.get_inputs()}
    int_type = {i.name: np.int32 if "int32" in i.type else np.int64 for i in sess.get_inputs()}
    prompt = _prompt(cfg.vocab_size)

    def run(ids, start, past):
        feed = {"input_ids": np.asarray([ids], dtype=int_type["input_ids"])}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, start + len(ids)), dtype=int_type["attention_mask"])
        if "position_ids" in names:
            feed["position_ids"] = np.arange(start, start + len(ids), dtype=int_type["position_ids"])[None]
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                feed[f"past_key_values.{i}.{kind}"] = past[2 * i + j]
        out = sess.run(None, feed)
        byname = dict(zip([o.name for o in sess.get_outputs()], out))
        return byname["logits"][0].astype(np.float32), [byname[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")]

    empty = [np.zeros((1, kv_heads, 0, d), dtype) for _ in range(2 * layers)]
    try:
        first, present = run(prompt, 0, empty)
        nxt = int(np.argmax(first[-1]))
        second, _ = run([nxt], len(prompt), present)
    except Exception as e:
        raise ModelError(f"{graph.name}: ONNX Runtime failed running the graph with past key values "
                         f"[1, {kv_heads}, past, {d}]: {str(e).splitlines()[0][:300]}") from None
    graph_logits = np.concatenate([first, second])
    if arch == "gpt2":
        ours = reference.gpt2_logits(cfg, weights, prompt + [nxt])
    else:
        from deploy.models.llama.loader import rope_inv_freq

        ours = reference.llama_logits(cfg, weights, prompt + [nxt], rope_inv_freq(cfg, weights.get("rope_freqs")))
    if graph_logits.shape != ours.shape:
        raise ModelError(f"{graph.name}: the graph's logits have shape {list(graph_logits.shape)}, the mapped model's {list(ours.shape)}")
    err = float(np.abs(graph_logits - ours).max() / max(float(np.abs(graph_logits).max()), 1e-6))
    tol = TOLERANCE.get(np.dtype(dtype), 1e-3)
    if not err <= tol:
        raise ModelError(f"{graph.name}: the weights read from the graph as {arch} do not reproduce it: logits differ from "
                         f"ONNX Runtime's by {err:.1e} of their scale (tolerance {tol:.0e}); the graph is not a model edgejit "
                         "can map onto its own definition")
    log(f"checked the mapping against ONNX Runtime {ort.__version__}: {len(prompt)}-token prompt and 1 decode step with "
        f"past, logits within {err:.1e} of their scale")
    return {"prompt_tokens": len(prompt), "decode_steps": 1, "max_rel_diff": err, "onnxruntime": ort.__version__}
