"""The daemon's configuration: a TOML file (see configs/daemon.toml), checked once at load time so
that a typo is a one-line error at startup, not a surprise at the first request."""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeJitError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(EdgeJitError):
    """The daemon configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the name clients use in URLs
    artifact: Path  # artifact directory (often a symlink flipped by the updater)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_body_mb: float = 16.0  # larger request bodies get 413
    max_batch: int = 64  # larger batches get 413 (memory grows with batch x length^2)
    workers: int = 2  # inference requests run at once
    queue: int = 32  # requests waiting for a worker; beyond that, 503
    request_timeout_s: float = 60.0  # waiting + running; then 503 (the work still finishes)
    max_connections: int = 64  # open client connections; beyond that, 503 and close
    idle_timeout_s: float = 30.0  # an idle keep-alive connection is closed after this
    read_timeout_s: float = 15.0  # the whole request (head and body) must arrive within this; then 408
    drain_timeout_s: float = 30.0  # on shutdown, how long in-flight requests may take
    admin_token: str = ""  # if set, /reload needs "Authorization: Bearer <token>"
    allow_remote_without_token: bool = False  # listen beyond loopback with no admin_token (refused otherwise)


@dataclass(frozen=True)
class GenerationConfig:
    """Text generation (decoder artifacts; the OpenAI-compatible API), per model."""

    max_seqs: int = 4  # sequences decoded together (continuous batching); KV cache for this many
    max_queue: int = 32  # requests waiting for a sequence slot; beyond that, 429 with Retry-After
    request_timeout_s: float = 300.0  # waiting + generating; then the request ends (KV freed)
    context: int = 0  # KV context per sequence in tokens; 0: the artifact's default context
    prefill_chunk: int = 0  # most prompt tokens per prefill step; 0: the artifact's
    prefix_cache_tokens: int = 2048  # KV of finished sequences kept for repeated prefixes (tokens); 0: off
    kv_cache_mb: float = 0.0  # KV memory in all (running + prefix cache); 0: max_seqs x context + prefix_cache_tokens


@dataclass(frozen=True)
class DaemonConfig:
    path: Path | None
    models: tuple[ModelConfig, ...]
    server: ServerConfig = ServerConfig()
    generation: GenerationConfig = GenerationConfig()
    telemetry: dict | None = None  # edge.telemetry settings (docs/telemetry.md); None: off
    jit: object = None  # None (no JIT), a mode/path string, or a dict of policy settings
    threads: int = 0  # TVM threads per inference; 0: cores / workers
    cache_dir: Path | None = None
    state_dir: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    allow_unsigned: bool = False  # unsigned artifacts load only when the config says so
    log_level: str = "info"


_SECTIONS = {"server", "models", "generation", "jit", "telemetry", "runtime", "paths", "log"}


def load_config(path: str | Path) -> DaemonConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(data, base=path.parent, path=path)


def parse_config(data: dict, *, base: Path, path: Path | None = None) -> DaemonConfig:
    where = str(path) if path else "config"
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section or key '{unknown[0]}' (known: {', '.join(sorted(_SECTIONS))})")

    def resolve(p) -> Path:
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else (base / p)

    models = []
    for i, m in enumerate(data.get("models", [])):
        if not isinstance(m, dict) or "artifact" not in m:
            raise ConfigError(f"{where}: [[models]] entry {i + 1} needs 'artifact' (and optionally 'name')")
        _no_unknown(m, {"name", "artifact"}, f"{where}: [[models]] entry {i + 1}")
        name = str(m.get("name") or Path(str(m["artifact"])).name)
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: model name '{name}' must be 1-64 letters, digits, '.', '_' or '-'")
        if any(x.name == name for x in models):
            raise ConfigError(f"{where}: model name '{name}' is used twice")
        models.append(ModelConfig(name, resolve(m["artifact"])))

    server = _section(data, "server", ServerConfig, where)
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"{where}: [server] port {server.port} is not a TCP port")
    if not server.host.strip():
        raise ConfigError(f"{where}: [server] host must not be empty")
    _ranges(server, "server", where)

    generation = _section(data, "generation", GenerationConfig, where)
    _ranges(generation, "generation", where)

    telemetry = _telemetry(data.get("telemetry"), resolve, where)

    jit = data.get("jit")
    if isinstance(jit, dict):
        jit = dict(jit)
        policy = jit.pop("policy", None)
        if policy not in (None, "default"):
            jit = {**_policy_file(resolve(policy) if str(policy).endswith(".toml") else policy, where), **jit}
        if jit.pop("enabled", True) is False:
            jit = None
    elif jit is not None:
        raise ConfigError(f"{where}: [jit] must be a table")

    runtime = data.get("runtime", {})
    _no_unknown(runtime, {"threads", "trusted_keys", "allow_unsigned"}, f"{where}: [runtime]")
    allow_unsigned = runtime.get("allow_unsigned", False)
    if not isinstance(allow_unsigned, bool):
        raise ConfigError(f"{where}: [runtime] allow_unsigned must be true or false")
    paths = data.get("paths", {})
    _no_unknown(paths, {"cache_dir", "state_dir"}, f"{where}: [paths]")
    log = data.get("log", {})
    _no_unknown(log, {"level"}, f"{where}: [log]")
    level = str(log.get("level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}: [log] level must be debug, info, warning or error")
    threads = runtime.get("threads", 0)
    if not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"{where}: [runtime] threads must be an integer >= 0")
    if isinstance(threads, bool):
        raise ConfigError(f"{where}: [runtime] threads must be an integer >= 0")
    keys = runtime.get("trusted_keys", [])
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{where}: [runtime] trusted_keys must be a path or a list of paths, got {keys!r}")
    return DaemonConfig(
        path=path,
        models=tuple(models),
        server=server,
        generation=generation,
        telemetry=telemetry,
        jit=jit,
        threads=threads,
        cache_dir=resolve(paths["cache_dir"]) if paths.get("cache_dir") else None,
        state_dir=resolve(paths["state_dir"]) if paths.get("state_dir") else None,
        trusted_keys=tuple(resolve(k) for k in keys),
        allow_unsigned=allow_unsigned,
        log_level=level,
    )


# (minimum, minimum included, maximum) of every number in [server] and [generation]: checked at
# load time so that a value that would misbehave at the first request (0 or inf timeouts, a
# negative queue) is a one-line error at startup naming the key.
_LIMIT = 1e6  # seconds, MiB, counts: far beyond any sensible setting, within what sockets and ints take
_RANGES = {
    "server": {
        "max_body_mb": (0, False, _LIMIT), "max_batch": (1, True, _LIMIT), "workers": (1, True, 4096),
        "queue": (0, True, _LIMIT), "request_timeout_s": (0, False, _LIMIT), "max_connections": (1, True, 65536),
        "idle_timeout_s": (0, False, _LIMIT), "read_timeout_s": (0, False, _LIMIT), "drain_timeout_s": (0, True, _LIMIT),
    },
    "generation": {
        "max_seqs": (1, True, 4096), "max_queue": (1, True, _LIMIT), "request_timeout_s": (0, False, _LIMIT),
        "context": (0, True, 1 << 24), "prefill_chunk": (0, True, 1 << 24),
        "prefix_cache_tokens": (0, True, 1 << 24), "kv_cache_mb": (0, True, _LIMIT),
    },
}


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine only (a name counts if every address it
    resolves to is a loopback one)."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_exposure(server: ServerConfig, where: str = "config") -> str | None:
    """Refuse to listen beyond loopback with the admin endpoints open to whoever can reach the port
    (ConfigError), unless the operator said so: then a warning to log. None when nothing to say."""
    if is_loopback(server.host) or server.admin_token:
        return None
    what = (f"[server] host '{server.host}' listens beyond this machine and no admin_token is set "
            "(anyone who can reach the port could reload models)")
    if not server.allow_remote_without_token:
        raise ConfigError(f"{where}: {what}: set [server] admin_token, listen on 127.0.0.1, or set "
                          "[server] allow_remote_without_token = true (--allow-remote-without-token) to accept that")
    return f"{what}; allowed by allow_remote_without_token"


def _ranges(obj, section: str, where: str) -> None:
    for key, (lo, inclusive, hi) in _RANGES[section].items():
        v = getattr(obj, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: [{section}] {key} must be a finite number, got {v!r}")
        if v < lo or (v == lo and not inclusive) or v > hi:
            bound = f">= {lo}" if inclusive else f"> {lo}"
            raise ConfigError(f"{where}: [{section}] {key} must be {bound} and <= {hi:g}, got {v!r}")


def _telemetry(tel, resolve, where: str) -> dict | None:
    """[telemetry] is edge.telemetry's settings plus `enabled`; checked here, at startup."""
    if tel is None:
        return None
    if not isinstance(tel, dict):
        raise ConfigError(f"{where}: [telemetry] must be a table")
    tel = dict(tel)
    if not tel.pop("enabled", True):
        return None
    for key in ("password_file", "spool_path"):
        if tel.get(key):
            tel[key] = str(resolve(tel[key]))
    if isinstance(tel.get("tls"), dict):
        tel["tls"] = {k: str(resolve(v)) if k.endswith("_file") and v else v for k, v in tel["tls"].items()}
    try:
        from edge.telemetry import TelemetryConfig
    except ImportError as e:
        raise ConfigError(f"{where}: [telemetry] is enabled but telemetry is unavailable here ({e})") from None
    try:
        TelemetryConfig.from_dict(tel, f"{where}: [telemetry]")
    except EdgeJitError as e:
        raise ConfigError(str(e)) from None
    return tel


def _policy_file(policy, where: str) -> dict:
    """[jit] policy = "on" | "off" | ... (a mode) or a path to a policy TOML file."""
    if isinstance(policy, Path):
        try:
            return tomllib.loads(policy.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{where}: [jit] policy file {policy}: {e}") from None
    return {"mode": str(policy)}


def _section(data: dict, name: str, cls, where: str):
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return _build(cls, value, f"{where}: [{name}]")


def _build(cls, values: dict, where: str):
    fields = cls.__dataclass_fields__
    _no_unknown(values, set(fields), where)
    for key, value in values.items():
        default = fields[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{where}: '{key}' should be a {type(default).__name__}, got {value!r}")
    return cls(**values)


def _no_unknown(values: dict, known: set, where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
