"""Start an MQTT broker for the demo and the tests: Mosquitto from a temp config on a free
loopback port, with password authentication and a per-device ACL (a device, whose username is its
device id, may publish only under its own id; see docs/telemetry.md).

    with Broker(users={"coordinator": "pw", "dev-a": "pw-a"}, coordinators=["coordinator"]) as b:
        b.host, b.port        # 127.0.0.1, a free port
        b.stop(); b.start()   # a restart keeps the port and the persisted sessions/queues

Only loopback addresses. Needs the `mosquitto` binary (Debian package `mosquitto`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from deploy.tools.processes import free_port, stop_process
from edge.errors import EdgeJitError

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(EdgeJitError):
    """The broker could not be started."""


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def fleet_acl(prefix: str = "edgejit", coordinators=("coordinator",)) -> str:
    """Mosquitto ACL: coordinators may read/write the whole prefix; every other user is a device
    whose username is its device id and may publish only its own birth/death/metrics/jit and read
    the coordinator topics."""
    lines = []
    for user in coordinators:
        lines += [f"user {user}", f"topic readwrite {prefix}/#", ""]
    lines.append("# all users: a device publishes only under its own id (%u = username)")
    for kind in ("birth", "death", "metrics", "jit"):
        lines.append(f"pattern write {prefix}/+/%u/{kind}")
    lines.append(f"pattern read {prefix}/+/_coordinator/state/+")
    lines.append(f"pattern read {prefix}/+/_coordinator/hot/+")
    lines.append(f"pattern read {prefix}/+/_coordinator/rebirth/%u")
    return "\n".join(lines) + "\n"


class Broker:
    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        users: dict[str, str] | None = None,
        coordinators=("coordinator",),
        prefix: str = "edgejit",
        acl: str | None = None,
        port: int | None = None,
        tls: bool = False,
        start: bool = True,
    ):
        """users: {username: password}; None means anonymous access without ACL. tls: serve TLS
        with a fresh self-signed CA (its certificate is `ca_file`) and a server certificate for
        127.0.0.1/localhost."""
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgejit-broker-")
            directory = self._tmp.name
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.users = dict(users or {})
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.ca_file = make_test_ca(self.dir) if tls else None
        self._write_config(acl if acl is not None else fleet_acl(prefix, coordinators))
        if start:
            self.start()

    def _write_config(self, acl: str) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",  # a coordinator away for a while must not lose its queue
            "max_inflight_messages 100",
        ]
        if self.ca_file:
            lines += [f"cafile {self.ca_file}", f"certfile {self.dir / 'server.pem'}", f"keyfile {self.dir / 'server.key'}"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to user 'mosquitto', who can't read our files
        if self.users:
            passwd = self.dir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            passwd.chmod(0o600)
            r = subprocess.run([_passwd_tool(self.binary), "-U", str(passwd)], capture_output=True, text=True)
            if r.returncode != 0:
                raise BrokerError(f"mosquitto_passwd failed: {r.stderr.strip() or r.stdout.strip()}")
            (self.dir / "acl").write_text(acl)
            (self.dir / "acl").chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {self.dir / 'acl'}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                raise BrokerError(f"mosquitto exited at start ({self.proc.returncode}): {err or self.log_tail()}")
            if _listening(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Clean stop (SIGTERM): mosquitto saves its persistence file."""
        if self.proc is None:
            return
        stop_process(self.proc, timeout, group=False)
        self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_test_ca(directory: Path) -> Path:
    """A throwaway CA (ca.pem) and a server certificate for 127.0.0.1/localhost (server.pem,
    server.key) valid for a day, for TLS in tests and the demo."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgejit test CA")])

    def cert(subject, public_key, *, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(cert(ca_name, ca_key.public_key(), ca=True).public_bytes(pem))
    server = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    (directory / "server.pem").write_bytes(cert(server, key.public_key(), ca=False).public_bytes(pem))
    key_file = directory / "server.key"
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _passwd_tool(binary: str) -> str:
    tool = shutil.which("mosquitto_passwd") or str(Path(binary).with_name("mosquitto_passwd"))
    if not os.access(tool, os.X_OK) and os.access("/usr/bin/mosquitto_passwd", os.X_OK):
        tool = "/usr/bin/mosquitto_passwd"
    return tool
