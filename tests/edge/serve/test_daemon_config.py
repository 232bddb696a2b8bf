"""Daemon configuration and request decoding: checked up front, one-line errors."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge.artifact.reader import TensorSpec
from edge.serve import codec
from edge.serve.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_example_config_parses():
    cfg = load_config(ROOT / "configs" / "daemon.toml")
    assert [m.name for m in cfg.models] == ["minilm"]
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8765
    assert cfg.jit == {} and cfg.telemetry is None  # JIT on with the default policy, telemetry off
    from edge.serve.config import GenerationConfig

    assert cfg.generation == GenerationConfig()  # the example shows the defaults
    from edge.serve.service import Daemon

    assert Daemon._check_jit(cfg.jit).mode == "on"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "d.toml").write_text('[[models]]\nartifact = "arts/bert"\n[paths]\ncache_dir = "c"\n[jit]\npolicy = "off"\n')
    cfg = load_config(tmp_path / "d.toml")
    assert cfg.models[0].name == "bert" and cfg.models[0].artifact == tmp_path / "arts" / "bert"
    assert cfg.cache_dir == tmp_path / "c" and cfg.jit == {"mode": "off"}


@pytest.mark.parametrize("text, message", [
    ('[server]\nprot = 1\n', "unknown key 'prot'"),
    ('[generation]\nmax_sequences = 4\n', "unknown key 'max_sequences'"),
    ('[generation]\nmax_seqs = 0\n', "max_seqs must be >= 1"),
    ('[generation]\nmax_queue = 0\n', "max_queue must be >= 1"),
    ('[generation]\nrequest_timeout_s = 0\n', "request_timeout_s must be > 0"),
    ('[server]\nport = "80"\n', "'port' should be a int"),
    ('[server]\nport = 70000\n', "not a TCP port"),
    ('[server]\nworkers = 0\n', "workers must be >= 1"),
    ('[[models]]\nname = "a b"\nartifact = "x"\n', "model name 'a b'"),
    ('[[models]]\nname = "a"\nartifact = "x"\n[[models]]\nname = "a"\nartifact = "y"\n', "used twice"),
    ('[[models]]\nname = "a"\n', "needs 'artifact'"),
    ('[modles]\n', "unknown section or key 'modles'"),
    ('[log]\nlevel = "loud"\n', "level must be"),
    ('[telemetry]\nport = "x"\nfleet = "f"\n', "port"),
    ('[server\n', "not valid TOML"),
])
def test_bad_config_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "d.toml").write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(tmp_path / "d.toml")
    assert "\n" not in str(e.value)


def test_bad_jit_policy_fails_at_startup(tmp_path):
    from edge.serve.service import Daemon
    from edge.errors import EdgeJitError

    cfg = parse_config({"models": [{"name": "a", "artifact": "x"}], "jit": {"min_hitz": 3}}, base=tmp_path)
    with pytest.raises(EdgeJitError, match="unknown key 'min_hitz'"):
        Daemon(cfg)


def test_cli_without_config_or_model_explains(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "daemon"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nothing to serve" in r.stderr and len(r.stderr.strip().splitlines()) == 1


SPECS = [TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("attention_mask", "int64", ("batch", "seq"))]


def test_npz_expansion_is_bounded_before_reading():
    buf = io.BytesIO()
    np.savez_compressed(buf, input_ids=np.zeros((1, 4_000_000), np.int64))  # 32 MB of zeros, tiny compressed
    body = buf.getvalue()
    assert len(body) < 200_000
    with pytest.raises(codec.BadRequest, match="expands to") as e:
        codec.decode_inputs(body, codec.NPZ, SPECS, max_bytes=1 << 20)
    assert e.value.status == 413


def test_npz_with_pickled_object_is_refused():
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.array([[1, "a"]], dtype=object))
    with pytest.raises(codec.BadRequest, match="npz"):
        codec.decode_inputs(buf.getvalue(), codec.NPZ, SPECS, max_bytes=1 << 20)


def test_json_values_keep_their_kind():
    arrays = codec.decode_inputs(b'{"inputs": {"input_ids": [[1, 2, 3]]}}', "application/json", SPECS, 1 << 20)
    assert arrays["input_ids"].dtype == np.int64
    assert (arrays["attention_mask"] == 1).all() and arrays["attention_mask"].shape == (1, 3)
    for body, message in [
        (b'{"inputs": {"input_ids": [[true]]}}', "booleans"),
        (b'{"inputs": {"input_ids": [[1e300]]}}', "floating-point"),
        (b'{"inputs": {"input_ids": [[99999999999999999999999]]}}', "range of int64|numbers"),
        (b'{"inputs": {"input_ids": [[1, [2]]]}}', "rectangular"),
        (b'[' * 100000, "malformed JSON"),
    ]:
        with pytest.raises(codec.BadRequest, match=message):
            codec.decode_inputs(body, "application/json", SPECS, 1 << 20)


def test_npz_response_round_trips():
    out = [np.arange(6, dtype=np.float32).reshape(1, 2, 3)]
    body, media = codec.encode_outputs("m", [TensorSpec("h", "float32", ("batch", "seq", 3))], out, codec.NPZ, {})
    assert media == codec.NPZ
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.namelist() == ["h.npy"]
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["h"], out[0])


def test_unsigned_artifacts_need_explicit_permission(tiny_artifact, tmp_path):
    """Issue 9: with no trusted keys, the daemon starts only if the config allows unsigned artifacts."""
    from edge.serve.service import Daemon
    from edge.artifact.trust import TrustConfigError

    cfg = parse_config({"models": [{"name": "t", "artifact": str(tiny_artifact)}]}, base=tmp_path)
    with pytest.raises(TrustConfigError, match="no trusted_keys configured"):
        Daemon(cfg)
    with pytest.raises(ConfigError, match="allow_unsigned must be true or false"):
        parse_config({"runtime": {"allow_unsigned": "yes"}}, base=tmp_path)


# -- issue 20, case 6: every value checked at load time, one line naming the key ------------------
@pytest.mark.parametrize("text, message", [
    ('[server]\nmax_body_mb = inf\n', "max_body_mb must be a finite number"),
    ('[server]\nmax_body_mb = nan\n', "max_body_mb must be a finite number"),
    ('[server]\nmax_body_mb = 0\n', "max_body_mb must be > 0"),
    ('[server]\nidle_timeout_s = 0.0\n', "idle_timeout_s must be > 0"),
    ('[server]\nidle_timeout_s = -inf\n', "idle_timeout_s must be a finite number"),
    ('[server]\nrequest_timeout_s = -1.0\n', "request_timeout_s must be > 0"),
    ('[server]\nrequest_timeout_s = 1e300\n', "request_timeout_s must be > 0 and <= 1e+06"),
    ('[server]\nread_timeout_s = 0\n', "read_timeout_s must be > 0"),
    ('[server]\ndrain_timeout_s = -1\n', "drain_timeout_s must be >= 0"),
    ('[server]\nqueue = -1\n', "queue must be >= 0"),
    ('[server]\nmax_connections = 0\n', "max_connections must be >= 1"),
    ('[server]\nmax_batch = 0\n', "max_batch must be >= 1"),
    ('[server]\nhost = ""\n', "host must not be empty"),
    ('[server]\nidle_timeout_s = "30"\n', "'idle_timeout_s' should be a float"),
    ('[server]\nworkers = true\n', "'workers' should be a int"),
    ('[generation]\nrequest_timeout_s = nan\n', "request_timeout_s must be a finite number"),
    ('[generation]\ncontext = -1\n', "context must be >= 0"),
    ('[generation]\nprefill_chunk = -5\n', "prefill_chunk must be >= 0"),
    ('[runtime]\ntrusted_keys = 5\n', "trusted_keys must be a path or a list of paths"),
    ('[runtime]\ntrusted_keys = ["a", 5]\n', "trusted_keys must be a path or a list of paths"),
    ('[runtime]\nthreads = -1\n', "threads must be an integer >= 0"),
    ('[runtime]\nthreads = true\n', "threads must be an integer >= 0"),
])
def test_every_config_value_is_checked_at_load(tmp_path, text, message):
    (tmp_path / "d.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(tmp_path / "d.toml")
    assert "\n" not in str(e.value)


def test_daemon_with_a_bad_config_value_exits_with_one_line(tmp_path):
    """The real `edgejit daemon` process: exit 1, one line naming the key, no traceback."""
    for text, key in [('[server]\nmax_body_mb = inf\n', "max_body_mb"), ('[runtime]\ntrusted_keys = 5\n', "trusted_keys"),
                      ('[server]\nidle_timeout_s = 0.0\n', "idle_timeout_s")]:
        (tmp_path / "d.toml").write_text('[[models]]\nname = "m"\nartifact = "x"\n' + text)
        r = subprocess.run([sys.executable, "-m", "edge.cli", "daemon", "--config", str(tmp_path / "d.toml")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
