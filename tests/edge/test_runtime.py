"""edge.Runtime: results equal ONNX Runtime's on the same file; bad inputs get one-line errors."""

import numpy as np
import onnxruntime as ort
import pytest

import edge
from edge.errors import InputError
from tests.fixtures import handmade


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    return edge.Runtime(tiny_artifact)


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [1, 7, 64, 128])
def test_matches_onnxruntime(runtime, reference, batch, seq):
    x = handmade.inputs(batch, seq, seed=seq)
    x["attention_mask"][:, seq // 2 + 1:] = 0
    got = runtime.run(x)
    want = reference.run(None, x)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())


def test_list_inputs_in_signature_order(runtime):
    x = handmade.inputs(1, 5)
    a = runtime.run(x)
    b = runtime.run([x["input_ids"], x["attention_mask"]])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.update(bogus=x.pop("input_ids")), "unknown input 'bogus'"),
    (lambda x: x.pop("input_ids"), "missing input 'input_ids'"),
    (lambda x: x.update(input_ids=x["input_ids"].astype(np.int32)), "input 'input_ids': dtype int32, expected int64"),
    (lambda x: x.update(input_ids=x["input_ids"][0]), "input 'input_ids': rank 1"),
    (lambda x: x.update(attention_mask=x["attention_mask"][:, :3]), "dim 1 \\('seq'\\) is 3 but another input has 5"),
    (lambda x: x.update(input_ids=x["input_ids"] + 1000), "outside \\[0, 63\\]"),
])
def test_bad_inputs(runtime, mutate, message):
    x = handmade.inputs(2, 5)
    mutate(x)
    with pytest.raises(InputError, match=message):
        runtime.run(x)


def test_sequence_longer_than_declared_max(runtime):
    with pytest.raises(InputError, match="'seq' = 129 is outside the model's range \\[1, 128\\]"):
        runtime.run(handmade.inputs(1, 129))


def test_concurrent_callers_get_their_own_results(runtime, reference):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        x = handmade.inputs(1, 1 + i % 40, seed=i)
        return np.abs(runtime.run(x)[1] - reference.run(None, x)[1]).max()

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(one, range(64))) < 1e-4


def test_left_out_mask_is_filled_like_the_cli_and_daemon(runtime):
    """Issue 20, case 10: one behaviour for edge.Runtime.run, `edgejit run` and the daemon."""
    x = handmade.inputs(2, 5)
    x["attention_mask"][:] = 1
    np.testing.assert_array_equal(runtime.run({"input_ids": x["input_ids"]})[0], runtime.run(x)[0])


def test_readme_python_snippet_runs(bert_artifact):
    """The README's edge.Runtime snippet, as written, on a BERT artifact (which also takes
    token_type_ids: left out in the snippet, filled with zeros)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "edge.Runtime(" in b]
    assert '"model-host"' in snippet
    rt_inputs = {s.name for s in edge.Runtime(bert_artifact).inputs}
    assert "token_type_ids" in rt_inputs
    ids = np.array([[1, 59, 88, 2]], dtype=np.int64)  # a tiny test vocabulary
    scope = {"ids": ids, "mask": np.ones_like(ids)}
    exec(compile(snippet.replace('"model-host"', repr(str(bert_artifact))), "README.md", "exec"), scope)
    scope["rt"].close()
    outputs = scope["outputs"]
    assert outputs and outputs[0].shape[:2] == (1, 4) and np.isfinite(outputs[0]).all()


def _cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], capture_output=True, text=True, cwd=root, timeout=300)


def test_targets_prints_a_header():
    """Issue 20, case 13."""
    r = _cli("targets")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["PRESET", "ARCH", "HERE", "DESCRIPTION"]


def test_run_allow_unsigned_does_not_warn(tiny_artifact):
    """Issue 20, case 13: without --allow-unsigned an unsigned artifact is a warning on every call;
    with it (the user asked), no warning."""
    plain = _cli("run", tiny_artifact, "--input", "input_ids=[[1,2,3]]")
    assert plain.returncode == 0 and "UNSIGNED" in plain.stderr, plain.stderr
    quiet = _cli("run", tiny_artifact, "--allow-unsigned", "--input", "input_ids=[[1,2,3]]")
    assert quiet.returncode == 0, quiet.stderr
    assert "UNSIGNED" not in quiet.stderr and "warning" not in quiet.stderr.lower(), quiet.stderr
    assert quiet.stdout == plain.stdout
