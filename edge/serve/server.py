"""The HTTP API (standard library only), in the conventions of local model servers:

    GET  /health                        200 when serving, 503 while loading or shutting down
    GET  /v1/models                     the models, their versions, signatures and JIT state
    GET  /v1/models/<name>              one of them
    POST /v1/models/<name>/infer        run it: JSON {"inputs": {...}} or an .npz body
    POST /v1/models/<name>/reload       swap in the artifact again / a new version, with rollback
    GET  /metrics                       Prometheus text format
    POST /v1/chat/completions           OpenAI-compatible chat (decoder artifacts), streamed as SSE or not
    POST /v1/completions                OpenAI-compatible text completion
    POST /v1/embeddings                 OpenAI-compatible embeddings (encoder artifacts with a tokenizer)

Bounds: connections (beyond: 503 and close), body size (413 before reading it), requests waiting
for an inference worker (beyond: 503 with Retry-After), generation requests waiting for a
sequence slot (beyond: 429 with Retry-After). Every error is JSON {"error": "...", "status": N};
on the OpenAI endpoints it is OpenAI's {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edge.errors import ArtifactError, EdgeJitError, InputError
from edge.serve import codec, embeddings
from edge.serve.generation import ApiError, Reply, Timing, error_doc, sampling_params, stream_options
from edge.serve.metrics import CONTENT_TYPE as METRICS_TYPE
from edge.serve.registry import ModelNotFound, ModelUnavailable

log = logging.getLogger("edgejit.daemon")
access_log = logging.getLogger("edgejit.daemon.access")

MODEL_PATH = re.compile(r"^/v1/models/([^/]+)(?:/(infer|reload))?/?$")
OPENAI_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}


STREAM_SNDBUF = 16 << 10  # bytes of SSE events the kernel may hold for a client that is not reading


class HttpError(EdgeJitError):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Saturated(HttpError):
    def __init__(self, message: str):
        super().__init__(503, message, {"Retry-After": "1"})


class _DeadlineReader(io.RawIOBase):
    """The connection's read side, with two clocks: while it waits for a request's first byte, an
    idle timeout (keep-alive); from that byte on, a deadline for the whole request head and body,
    however slowly it trickles in (a client sending a byte every few seconds is cut off all the
    same). Writes keep the idle timeout. While it waits or reads, the server may evict it to make
    room for a new connection (`evict()`): its read then fails at once."""

    def __init__(self, sock, idle_s: float, read_s: float):
        self.sock, self.idle_s, self.read_s = sock, idle_s, read_s
        self.deadline: float | None = None  # None: waiting for the next request
        self.reading = True  # False once the request is read: reads then use the socket's timeout
        self.expired = False
        self.got_bytes = False
        self.since = time.monotonic()  # when it began waiting for, or reading, this request
        self.evicted = False

    def readable(self) -> bool:
        return True

    def next_request(self) -> None:
        self.deadline, self.reading, self.expired, self.got_bytes = None, True, False, False
        self.since = time.monotonic()
        self.sock.settimeout(self.idle_s)

    def evict(self) -> None:
        """Close the read side (from the accepting thread): a blocked read returns at once."""
        self.evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def reply_ending(self) -> None:
        """The reply's last bytes are about to be written: from here the connection counts as
        waiting for its next request, so a client that opens another connection the moment it has
        its reply finds this one idle (evictable), not busy. Eviction shuts the read side only: the
        last bytes still go out."""
        self.next_request()

    def request_read(self) -> None:
        """The request is read: what follows (the reply) is not under the read deadline."""
        self.reading = False
        self.sock.settimeout(self.idle_s)

    def readinto(self, b) -> int:
        if not self.reading:
            return self.sock.recv_into(b)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise TimeoutError("the request was not received in time")
            self.sock.settimeout(min(self.idle_s, left))
        try:
            n = self.sock.recv_into(b)
        except TimeoutError:
            self.expired = self.got_bytes
            raise
        finally:
            self.sock.settimeout(self.idle_s)
        if self.evicted:
            raise ConnectionAbortedError("closed to make room for another connection")
        if n:
            if not self.got_bytes:
                self.since = time.monotonic()
            self.got_bytes = True
            if self.deadline is None:
                self.deadline = time.monotonic() + self.read_s
        return n


def _allowed(path: str) -> str:
    """The methods a path takes (the Allow header of a 405)."""
    path = urlsplit(path or "/").path
    if path.rstrip("/") in OPENAI_PATHS:
        return "POST"
    m = MODEL_PATH.match(path)
    if m and m.group(2):
        return "POST"
    return "GET, HEAD"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, service):
        self.service = service
        self._connections = 0
        self._conn_lock = threading.Lock()
        self._readers: dict[int, _DeadlineReader] = {}  # open connections' read sides, by socket
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        """Admit a connection. When every slot is taken, the connection that has waited longest
        without a whole request (idle keep-alive first, then one still trickling its request in)
        is closed to make room: slow clients cannot hold slots that requests ready to run need.
        Only when every connection has a request in progress is the new one turned away (503)."""
        with self._conn_lock:
            evicting = sum(1 for r in self._readers.values() if r.evicted)
            full = self._connections - evicting >= self.service.cfg.server.max_connections
            if full:
                victim = min((r for r in self._readers.values() if r.reading and not r.evicted),
                             key=lambda r: (r.got_bytes, r.since), default=None)
                if victim is not None:
                    victim.evict()
                    self.service.metrics.count_rejected("evicted_idle" if not victim.got_bytes else "evicted_slow")
                    full = False
            if not full:
                self._connections += 1
        if full:
            self.service.metrics.count_rejected("connections")
            body = b'{"error":"too many open connections; retry shortly"}'
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._connections -= 1
                self._readers.pop(id(request), None)

    def register(self, request, reader: "_DeadlineReader") -> None:
        with self._conn_lock:
            self._readers[id(request)] = reader

    def handle_error(self, request, client_address):
        """A client that resets its connection (e.g. one that walked away from a stream) is not a
        server error: one debug line instead of socketserver's traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            access_log.debug("%s: connection closed by the client (%s)", client_address[0], type(exc).__name__)
            return
        log.error("error while handling a request from %s", client_address[0], exc_info=True)

    @property
    def connections(self) -> int:
        return self._connections


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgejit"
    sys_version = ""
    # Headers and body are two writes: with Nagle on, the body waits for the client's delayed
    # ACK (40 ms on Linux) whenever the response is small.
    disable_nagle_algorithm = True

    def version_string(self):
        return self.server_version

    def setup(self):
        srv = self.server.service.cfg.server
        self.timeout = srv.idle_timeout_s  # idle keep-alive / slow clients
        super().setup()
        self._reader = _DeadlineReader(self.connection, srv.idle_timeout_s, srv.read_timeout_s)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.server.register(self.request, self._reader)

    def handle_one_request(self):
        """http.server's, with a deadline on reading the request and JSON answers for what it
        refuses (a request head too slow, too long or malformed; an unknown method)."""
        self._reader.next_request()
        self._responded = False
        self.request_version, self.command, self.path, self.requestline = "HTTP/1.1", "", "", ""
        try:
            super().handle_one_request()
        except TimeoutError:
            self.close_connection = True
        except (ConnectionError, ValueError):  # the client went away (ValueError: I/O on a closed file)
            self.close_connection = True
            if self._reader.evicted:  # closed to make room: a half-sent request is told why
                access_log.info("%s: connection closed to make room (%s)", self.client_address[0],
                                "mid-request" if self._reader.got_bytes else "idle")
                if self._reader.got_bytes and not self._responded:
                    try:
                        self._raw_error(503, "too many open connections: this slow request was closed to make room; retry",
                                        {"Retry-After": "1"})
                    except OSError:
                        pass
                return
            access_log.debug("%s: connection closed by the client", self.client_address[0])
            return
        if self._reader.expired and not self._responded:
            self.close_connection = True
            self.service.metrics.count_rejected("read_timeout")
            try:
                self._raw_error(408, f"the request was not received within {self.service.cfg.server.read_timeout_s:g}s ([server] read_timeout_s)")
            except OSError:
                pass

    def _raw_error(self, status: int, message: str, headers: dict | None = None) -> None:
        """A JSON error written directly (the request may not have been parsed)."""
        from http import HTTPStatus

        body = (json.dumps({"error": message, "status": status}) + "\n").encode()
        reason = HTTPStatus(status).phrase
        head = [f"HTTP/1.1 {status} {reason}", f"Server: {self.server_version}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items()), "Connection: close"]
        self._responded = True
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.wfile.flush()
        access_log.info("%s -> %d: %s", self.client_address[0], status, message)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, headers too long, an unknown method) as
        JSON errors like every other; an unknown method is a 405 with Allow."""
        self.close_connection = True
        headers = None
        if code == 501:  # a method no endpoint takes
            code, headers = 405, {"Allow": _allowed(self.path)}
            message = f"method {self.command} not allowed on {urlsplit(self.path or '/').path} (use {headers['Allow']})"
        try:
            self._raw_error(code, message or "bad request", headers)
        except OSError:
            pass

    @property
    def service(self):
        return self.server.service

    def finish(self):
        # After a 413, swallow a little of the unread body so that closing does not reset the
        # connection before the client has read the response.
        if getattr(self, "_unread", 0):
            try:
                self.wfile.flush()
                self.connection.settimeout(0.5)
                deadline, left = time.monotonic() + 1.0, min(self._unread, 8 << 20)
                while left > 0 and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(left, 1 << 16)) if hasattr(self.rfile, "read1") else b""
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass
        super().finish()

    def log_message(self, fmt, *args):  # http.server's own messages (bad request lines, timeouts)
        access_log.debug("%s %s", self.address_string(), fmt % args)

    # -- dispatch ----------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if self.headers.get("Content-Length") is None and "Transfer-Encoding" not in self.headers:
            self._reader.request_read()  # no body to wait for: the request is here, work on it
        try:
            self._dispatch1(method)
        except (ConnectionError, TimeoutError, ValueError) as e:  # the client went away / stopped reading
            self.close_connection = True
            access_log.debug("%s: %s %s: connection lost (%s)", self.client_address[0], method, self.path, type(e).__name__)

    def _dispatch1(self, method: str) -> None:
        start = time.perf_counter()
        path = urlsplit(self.path).path
        model, endpoint, status = "", path, 500
        self._openai = path.rstrip("/") in OPENAI_PATHS
        self._gen_model = ""  # the (known) model an OpenAI request named, for the metrics label
        try:
            m = MODEL_PATH.match(path)
            if self._openai:
                endpoint = path.rstrip("/")
                if method != "POST":
                    self._drain_body()
                    raise HttpError(405, f"{path}: use POST", {"Allow": "POST"})
                if endpoint == "/v1/embeddings":
                    model, status = embeddings.serve(self)  # encoder artifacts (edge/serve/embeddings.py)
                else:
                    model, status = self._generate(OPENAI_PATHS[endpoint])
            elif m:
                model, action = unquote(m.group(1)), m.group(2) or "info"
                endpoint = action
                allowed = "POST" if action in ("infer", "reload") else "GET"
                if method != allowed and not (method == "HEAD" and allowed == "GET"):
                    self._drain_body()
                    raise HttpError(405, f"{path}: use {allowed}", {"Allow": allowed if allowed == "POST" else "GET, HEAD"})
                status = {"infer": self._infer, "reload": self._reload, "info": self._model_info}[action](model)
            elif path in ("/health", "/metrics", "/v1/models", "/"):
                endpoint = path
                if method not in ("GET", "HEAD"):
                    self._drain_body()
                    raise HttpError(405, f"{path}: use GET", {"Allow": "GET, HEAD"})
                status = {"/health": self._health, "/metrics": self._metrics, "/v1/models": self._models, "/": self._models}[path]()
            else:
                endpoint = "other"  # never a label per client-chosen path
                self._drain_body()
                raise HttpError(404, f"no endpoint {path} (see /v1/models, /health, /metrics)")
        except ApiError as e:
            status = self._error(e.status, str(e), e.headers, param=e.param, code=e.code)
        except HttpError as e:
            status = self._error(e.status, str(e), e.headers)
        except codec.BadRequest as e:
            status = self._error(e.status, str(e))
        except InputError as e:
            status = self._error(400, str(e))
        except ModelNotFound as e:
            status = self._error(404, str(e), param="model", code="model_not_found")
        except ModelUnavailable as e:
            status = self._error(503, str(e), {"Retry-After": "5"}, code="model_unavailable")
        except ArtifactError as e:
            status = self._error(422, str(e))
        except (ConnectionError, TimeoutError):  # the client went away (or stopped reading the reply)
            self.close_connection = True
            status = 499
            if self._reader.evicted and not self._responded:  # its body trickled in too slowly, and a slot was needed
                status = self._error(503, "too many open connections: this slow request was closed to make room; retry",
                                     {"Retry-After": "1"})
        except Exception as e:  # a bug: report it, keep serving
            log.exception("internal error on %s %s", method, path)
            status = self._error(500, f"internal error: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - start
        model = model or self._gen_model
        if model and model not in self.service.registry.names():
            model = "?"  # never a label per client-chosen name
        self.service.metrics.count_http(model, endpoint, status)
        access_log.debug('%s "%s %s" %d %.1fms', self.client_address[0], method, path, status, elapsed * 1e3)

    # -- bodies and responses ----------------------------------------------------------------
    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(411, "chunked bodies are not supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"bad Content-Length '{length}'") from None
        if n > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._unread = n
            self._reader.request_read()
            raise HttpError(413, f"request body of {n} bytes is over the limit of {limit} bytes (send large tensors as .npz, or raise [server] max_body_mb)")
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            self._reader.request_read()
            raise HttpError(408, f"request body not received in time ({n} bytes announced by Content-Length; "
                                 f"[server] read_timeout_s = {self.service.cfg.server.read_timeout_s:g})") from None
        self._reader.request_read()
        if len(body) != n:
            self.close_connection = True
            raise HttpError(400, f"request body shorter than its Content-Length ({len(body)} of {n} bytes)")
        return body

    def _drain_body(self) -> None:
        try:
            self._read_body(self.service.max_body)
        except HttpError:
            self.close_connection = True

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection or self.service.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._reader.reply_ending()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._responded = True
        return status

    def _json(self, status: int, doc, headers: dict | None = None) -> int:
        return self._send(status, (json.dumps(doc, indent=1) + "\n").encode(), codec.JSON, headers)

    def _error(self, status: int, message: str, headers: dict | None = None, *, param=None, code=None) -> int:
        if status >= 500 and status != 503:
            log.warning("%s %s -> %d: %s", self.command, self.path, status, message)
        else:
            access_log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        if getattr(self, "_openai", False):
            if code is None and status == 413:
                code = "request_too_large"
            return self._json(status, error_doc(status, message, param, code), headers)
        return self._json(status, {"error": message, "status": status}, headers)

    # -- endpoints -------------------------------------------------------------------------
    def _health(self) -> int:
        doc = self.service.health()
        return self._json(200 if doc["status"] in ("ok", "degraded") else 503, doc)

    def _metrics(self) -> int:
        return self._send(200, self.service.metrics.render().encode(), METRICS_TYPE)

    def _models(self) -> int:
        names = self.service.registry.names()
        return self._json(200, {"object": "list", "data": [self.service.openai_model(n) for n in names],
                                "models": [self.service.describe(n) for n in names]})

    def _model_info(self, name: str) -> int:
        self.service.registry.slot(name)  # 404 for unknown names
        return self._json(200, {"id": name, "object": "model", "owned_by": "edgejit", **self.service.describe(name)})

    def _infer(self, name: str) -> int:
        svc = self.service
        if svc.draining:
            self._drain_body()
            self.service.metrics.count_rejected("draining")
            raise HttpError(503, "the daemon is shutting down", {"Retry-After": "5"})
        body = self._read_body(svc.max_body)
        start = time.perf_counter()
        slot = svc.registry.slot(name)  # 404 before any work
        if slot.current is not None and getattr(slot.current.runtime, "is_generation", False):
            raise HttpError(400, f"model '{name}' is a text-generation model: use POST /v1/chat/completions or /v1/completions")
        content_type = self.headers.get("Content-Type")
        accept = self.headers.get("Accept", "")
        if not any(t in accept for t in (codec.JSON, codec.NPZ)):
            accept = content_type or codec.JSON  # answer in the request's encoding
        future, ticket = svc.submit(slot.name, body, content_type, accept)
        try:
            payload, media, info = self._wait(future, ticket, svc.cfg.server.request_timeout_s)
            svc.metrics.observe_request(name, time.perf_counter() - start)
            headers = {
                "X-Edgejit-Model-Version": info["version"],
                "X-Edgejit-Module": info["module"],
                "X-Edgejit-Inference-Ms": f"{info['inference_ms']:.3f}",
            }
            return self._send(200, payload, media, headers)
        except HttpError as e:
            return self._error(e.status, str(e), e.headers)
        except codec.BadRequest as e:
            return self._error(e.status, str(e))
        except InputError as e:
            return self._error(400, str(e))
        except ModelUnavailable as e:
            return self._error(503, str(e), {"Retry-After": "5"})
        finally:
            ticket.release()  # after the response is written: shutdown waits for it

    def _wait(self, future, ticket, timeout: float):
        """The inference's result; a client that hangs up meanwhile has its request cancelled
        (dropped from the queue if it has not started) and gets no reply."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if future.cancel():
                    ticket.release()  # the worker's share: it will not run
                raise HttpError(503, f"request took longer than {timeout:g}s (server busy)", {"Retry-After": "5"})
            try:
                return future.result(timeout=min(left, 0.25))
            except FutureTimeout:
                pass
            if self._client_gone():
                if future.cancel():
                    ticket.release()
                raise ConnectionResetError("the client closed the connection before its reply")

    def _client_gone(self) -> bool:
        import select

        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _reload(self, name: str) -> int:
        svc = self.service
        token = svc.cfg.server.admin_token
        body = self._read_body(svc.max_body)
        if token and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
            self.service.metrics.count_rejected("unauthorized")
            raise HttpError(401, "reload needs 'Authorization: Bearer <admin_token>' ([server] admin_token)",
                            {"WWW-Authenticate": 'Bearer realm="edgejit admin"'})
        slot = svc.registry.slot(name)
        path = None
        if body.strip():
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError) as e:
                raise codec.BadRequest(f"malformed JSON: {e}") from None
            if not isinstance(doc, dict) or set(doc) - {"artifact"}:
                raise codec.BadRequest('the body must be empty or {"artifact": "<directory>"}')
            if doc.get("artifact"):
                path = Path(str(doc["artifact"]))
                allowed = svc.configured_artifact(name).parent.resolve()
                if not path.is_absolute() or path.resolve().parent != allowed:
                    raise HttpError(403, f"a new artifact must be a directory next to the configured one, in {allowed}")
        try:
            result = svc.reload(slot.name, path)
        except ArtifactError as e:
            current = slot.current.describe() if slot.current else None
            return self._json(422, {"error": str(e), "status": 422, "result": "rolled_back" if current else "failed", "current": current})
        return self._json(200, result)

    # -- OpenAI-compatible generation ---------------------------------------------------------
    def _api_request(self, *, generation: bool) -> tuple[dict, str]:
        """The start of every OpenAI-style POST: refused while draining (503), the body read as a
        JSON object (400 otherwise), and the model it names, or the only loaded model of the kind
        asked (text generation or not) when it names none. Returns (document, model name)."""
        svc = self.service
        if svc.draining:
            self._drain_body()
            svc.metrics.count_rejected("draining")
            raise ApiError(503, "the daemon is shutting down", headers={"Retry-After": "5"})
        body = self._read_body(svc.max_body)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "the body must be a JSON object")
        name = doc.get("model")
        if name is None or name == "":
            kind = [s.name for s in svc.registry.slots()
                    if s.current is not None and getattr(s.current.runtime, "is_generation", False) == generation]
            if len(kind) != 1:
                raise ApiError(400, "'model' is required (GET /v1/models lists them)", param="model")
            name = kind[0]  # one model of that kind: the default
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", param="model")
        return doc, name

    def _generate(self, kind: str) -> tuple[str, int]:
        """POST /v1/chat/completions (kind "chat") or /v1/completions: returns (model, status)."""
        svc = self.service
        doc, name = self._api_request(generation=True)
        self._timing = Timing()  # TTFT counts from here (prompt preparation included)
        version = svc.registry.acquire(name)  # 404 unknown, 503 loading/failed
        self._gen_model = name
        try:
            gm = self._gen_runtime = version.runtime
            if not getattr(gm, "is_generation", False):
                raise ApiError(400, f"model '{name}' is not a text-generation model (use /v1/models/{name}/infer)", param="model")
            chat = kind == "chat"
            stream, include_usage = stream_options(doc)
            prompt = gm.chat_prompt(doc) if chat else gm.completion_prompt(doc)
            gm.check_length(prompt, "messages" if chat else "prompt")
            params = sampling_params(doc, len(prompt), gm.context, chat=chat)
            from edge.generate.engine import QueueFull

            svc.hold()
            try:
                try:
                    self._timing.submit()
                    handle = gm.engine.submit(prompt, params)
                except QueueFull as e:
                    svc.metrics.count_rejected("generation_queue_full")
                    raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
                except EdgeJitError as e:  # the engine closed under a reload: the client retries
                    raise ApiError(503, str(e), headers={"Retry-After": "1"}) from None
                reply = Reply(chat, name, version.version)
                self._watch_disconnect(handle)
                if stream:
                    status = self._stream_reply(name, handle, reply, include_usage)
                else:
                    status = self._final_reply(name, handle, reply)
            finally:
                svc._done()
            return name, status
        finally:
            self._gen_runtime = None  # a keep-alive connection must not hold a swapped-out version
            svc.registry.release(name, version)

    def _watch_disconnect(self, handle) -> None:
        """Cancel the request if the client closes its connection while it waits or generates
        (a stream also notices at its next write; this catches non-streaming requests and the
        time before the first token)."""
        import select
        import socket as _socket

        sock = self.connection

        def watch():
            while not handle.done:
                try:
                    readable, _, _ = select.select([sock], [], [], 0.25)
                    if not readable:
                        continue
                    if sock.recv(1, _socket.MSG_PEEK) == b"":
                        handle.cancel()
                        access_log.info("%s closed the connection: request cancelled", self.client_address[0])
                    return  # EOF, or the next pipelined request's bytes: nothing more to watch
                except (OSError, ValueError):
                    handle.cancel()
                    return

        threading.Thread(target=watch, name="edgejit-watch", daemon=True).start()

    def _gone(self, name: str, handle) -> int:
        self._account(name, handle, "cancelled")
        self.close_connection = True
        return 499

    def _account(self, name: str, handle, reason: str | None = None) -> None:
        st = handle.stats
        reason = reason or st.finish_reason or "cancelled"
        self.service.metrics.on_generation(name, st.prompt_tokens, st.completion_tokens, reason,
                                           self._timing.result(st)[0] if st.completion_tokens else None)
        self._gen_runtime.account(st, self._timing)  # per-request speed: metrics histograms and fleet telemetry

    def _final_reply(self, name: str, handle, reply: Reply) -> int:
        try:
            text = "".join(handle)
        except EdgeJitError as e:
            self._account(name, handle)
            timeout = handle.stats.finish_reason == "timeout"
            raise ApiError(503 if timeout else 500, str(e), code="timeout" if timeout else None,
                           headers={"Retry-After": "5"} if timeout else None) from None
        if handle.stats.finish_reason == "cancelled":  # the client went away
            return self._gone(name, handle)
        self._account(name, handle)
        return self._json(200, reply.final(text, handle.stats.finish_reason, handle.stats))

    def _stream_reply(self, name: str, handle, reply: Reply, include_usage: bool) -> int:
        """Server-Sent Events as OpenAI sends them, over a chunked HTTP/1.1 response. A write that
        fails cancels the request (its KV is freed at the engine's next step): the client went away,
        or it stopped reading and a write made no progress for idle_timeout_s. The engine never
        waits for a reader (its pieces queue here), so a slow reader delays nobody else."""
        # A small send buffer, so a client that reads nothing fills it (and is cut off) after a
        # few KB of events instead of after the megabytes the kernel would buffer for it.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")  # a proxy in front must not buffer the stream
        if self.service.draining:
            self.send_header("Connection", "close")
            self.close_connection = True

        def event(doc) -> None:
            data = b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            self.end_headers()
            if reply.chat:  # the first chunk carries the role (and sends the headers' worth of news early)
                event(reply.chunk(content="", role=True, include_usage=include_usage))
            try:
                for piece in handle:
                    event(reply.chunk(content=piece, include_usage=include_usage))
                    self._timing.sent()
            except EdgeJitError as e:  # timed out or failed mid-stream: OpenAI's error event, then the end
                self._account(name, handle)
                code = "timeout" if handle.stats.finish_reason == "timeout" else None
                event(error_doc(503 if code else 500, str(e), None, code))
                event(b"[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                return 200
            st = handle.stats
            if st.finish_reason == "cancelled":  # the client went away
                return self._gone(name, handle)
            event(reply.chunk(finish_reason=st.finish_reason, include_usage=include_usage))
            if include_usage:
                event(reply.usage_chunk(st))
            event(b"[DONE]")
            self._reader.reply_ending()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # BrokenPipe, ConnectionReset, a timed-out slow client
            handle.cancel()
            access_log.info("%s went away mid-stream: request cancelled", self.client_address[0])
            return self._gone(name, handle)
        self._account(name, handle)
        return 200
