"""JIT for generation: decode steps are specialized by batch size (the number of sequences decoded
together) in the background, through the same policy, worker, cache and swap as encoder lengths;
the variant's tokens and logits equal the generic module's."""

from __future__ import annotations

import numpy as np
import pytest

from edge.jit.policy import JitPolicy
from tests.fixtures.decoding import greedy_decode

PROMPT = [504, 3575, 282, 4649, 314]


def _greedy(gen, n=12):
    return greedy_decode(gen.model.decoder, PROMPT, n)


@pytest.mark.parametrize("isolate", [True, False])
def test_decode_batch_variant_serves_and_matches(tiny_llamas, tmp_path, isolate):
    from edge.generate import Generator

    _, art = tiny_llamas["gqa_tied"]
    want_toks, want_logits = _greedy(Generator(art))
    events = []

    class Listener:
        def on_request(self, model, batch, kind, seconds):
            events.append(("request", batch, kind))

        def on_jit(self, model, payload):
            events.append(("jit", payload["event"], payload["bucket"]))

    policy = JitPolicy(min_hits=2, isolate=isolate, preload="lazy")
    with Generator(art, jit=policy, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", listeners=[Listener()]) as gen:
        _greedy(gen, 4)  # batch-1 decode steps: hot after 2
        spec = gen.model.decoder.specializer
        assert spec.wait_idle(300)
        assert spec.ready_lengths() == [1], spec.stats()
        toks, logits = _greedy(gen)
        stats = spec.stats()
    assert toks == want_toks
    np.testing.assert_allclose(logits, want_logits, atol=1e-4 * np.abs(want_logits).max())
    assert stats["lengths"][1]["served"]["variant"] >= 11
    assert ("jit", "swapped_in", 1) in events and ("request", 1, "variant") in events
    # a restart finds the variant in the cache (no compile)
    with Generator(art, jit=JitPolicy(min_hits=1, isolate=isolate), cache_dir=tmp_path / "cache", state_dir=tmp_path / "state") as gen:
        spec = gen.model.decoder.specializer
        assert spec.wait_idle(300)
        assert spec.stats()["variants"][1]["source"] == "cache"
        assert _greedy(gen)[0] == want_toks


def test_decode_variants_compiled_into_the_artifact(tiny_llamas, tmp_path):
    """`edgejit compile` builds the batch-1 decode step into the artifact (--decode-variants, default
    1): the device serves it from the first token, with no compile, and its tokens and logits equal
    the generic module's; 'none' leaves it to the JIT; a bad value is one line. (The CLI compiles
    for int8 activations: on a VNNI host both modules take them.)"""
    import json
    import subprocess
    import sys

    from edge.generate import Generator

    from edge.artifact.targets import get_preset
    from edge.kernels import dense_int8act

    fx, _ = tiny_llamas["q4_1_gqa"]
    out = tmp_path / "art"
    run = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(fx["path"]), "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "built the decode step of 1 sequence(s)" in run.stdout + run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["variants"] == {"1": "decode-b1.so"} and "decode-b1.so" in manifest["files"]
    int8 = dense_int8act.isa(get_preset("host").tvm_target()) is not None
    assert manifest["quantization"]["activations"].startswith("int8" if int8 else "fp32")
    assert manifest["decoder"]["config"]["kv_cache_dtype"] == "float16"  # the CLI's default, as llama.cpp's
    want_toks, want_logits = _greedy(Generator(out))  # the generic module alone
    events = []

    class Listener:
        def on_request(self, model, batch, kind, seconds):
            pass

        def on_jit(self, model, payload):
            events.append((payload["event"], payload["bucket"], payload.get("source")))

    with Generator(out, jit="default", cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", listeners=[Listener()]) as gen:
        spec = gen.model.decoder.specializer
        assert spec.ready_lengths() == [1] and spec.stats()["variants"][1]["source"] == "artifact"
        toks, logits = _greedy(gen)
        served = spec.stats()["lengths"][1]["served"]
    assert toks == want_toks
    np.testing.assert_allclose(logits, want_logits, atol=1e-4 * np.abs(want_logits).max())
    assert served["variant"] >= 11 and not served.get("generic")
    assert not [e for e in events if e[0] == "compile_started"]

    none = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(fx["path"]), "-o", str(tmp_path / "none"),
                           "--decode-variants", "none"], capture_output=True, text=True, timeout=600)
    assert none.returncode == 0, none.stderr
    assert "variants" not in json.loads((tmp_path / "none" / "manifest.json").read_text())["decoder"]
    bad = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(fx["path"]), "-o", str(tmp_path / "bad"),
                          "--decode-variants", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "edgejit compile: error: --decode-variants 0: batch sizes are 1 or more"]
    assert not (tmp_path / "bad").exists()
