"""A real nginx on loopback as the upstream: a parser nobody here wrote (Debian's package).

    server = start_nginx(tmp_dir)                 # keeps bodies, answers "seen <target>"
    mark = server.mark()
    ... send through the proxy ...
    seen = await server.lines_since(mark, expect=1)
    server.body(seen[0])                          # the body bytes nginx read
    server.stop()

    start_nginx(tmp_dir, answer="ok")            # fuzzing: a fixed answer that echoes nothing

Runs as any user: pid, logs and temp paths live in the directory, `daemon off` under this
process. The access log is one JSON object a line with the raw request line, the lengths and
(with `keep_bodies`, through `client_body_in_file_only`) the file holding the body nginx read:
nginx has no body checksum variable, so the test reads the bytes back.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

# What nginx logs of each request it parsed.
_FIELDS = {
    "request": "$request",  # the raw request line as nginx read it
    "content_length": "$content_length",
    "request_length": "$request_length",  # head + body bytes read
    "body_file": "$request_body_file",  # the body as nginx read it (kept on disk)
    "status": "$status",
    "te": "$http_transfer_encoding",
    "content_encoding": "$http_content_encoding",
    "expect": "$http_expect",
    "upgrade": "$http_upgrade",
    "http2_settings": "$http_http2_settings",
    "accept": "$http_accept",
    "accept_encoding": "$http_accept_encoding",
    "user_agent": "$http_user_agent",
    "x_original_url": "$http_x_original_url",
    "x_rewrite_url": "$http_x_rewrite_url",
    "x_real_ip": "$http_x_real_ip",
    "user_id": "$http_x_auth_user_id",
    "connection": "$connection",
}
_LOG_FORMAT = "{" + ",".join(f'"{k}":"{v}"' for k, v in _FIELDS.items()) + "}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf(directory: Path, port: int, inner: int, answer: str | None, access_log: bool) -> str:
    log = f"access_log {directory}/access.log seen;" if access_log else "access_log off;"
    if answer is None:
        # `proxy_pass` makes nginx read the whole body (a `return` would discard it unread); the
        # inner server's answer names the target, so the order of the answers can be checked
        front = f"""
        client_body_in_file_only on;  # every body read is kept: the test reads it back
        location / {{ proxy_pass http://127.0.0.1:{inner}; }}"""
        inner_server = f"""
    server {{
        listen 127.0.0.1:{inner};
        access_log off;
        location / {{ return 200 "seen $request_uri\\n"; }}
    }}"""
    else:
        front = f'location / {{ return 200 "{answer}\\n"; }}'
        inner_server = ""
    return main_conf(
        directory,
        f"""
    log_format seen escape=json '{_LOG_FORMAT}';
    keepalive_requests 1000000;
    large_client_header_buffers 4 64k;  # long tokens reach it: the proxy's limits are tested
    server {{
        listen 127.0.0.1:{port};
        {log}
        client_max_body_size 0;
        {front}
    }}
    {inner_server}""",
    )


def main_conf(directory: Path, http: str) -> str:
    """A whole nginx.conf that runs as any user from `directory`, around an `http` block."""
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # root: workers stay root
    return f"""
{user}
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {directory}/body 1 2;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    {http}
}}
"""


@dataclass
class Seen:
    """One request nginx parsed, as its access log tells."""

    fields: dict[str, str]

    @property
    def request(self) -> str:
        return self.fields["request"]

    def __getitem__(self, name: str) -> str:
        return self.fields[name]


@dataclass
class Nginx:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.directory / "access.log"

    def mark(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def read(self, mark: int) -> list[Seen]:
        if not self.log.exists():
            return []
        with self.log.open("rb") as file:
            file.seek(mark)
            text = file.read().decode()
        complete = text[: text.rfind("\n") + 1]  # a line being written is read next time
        return [Seen(json.loads(line)) for line in complete.splitlines() if line]

    async def lines_since(self, mark: int, expect: int, settle: float = 0.2) -> list[Seen]:
        """The lines logged since `mark`: wait for `expect` of them, then `settle` for more."""
        deadline = time.monotonic() + 5
        # a file, not an event: nginx is another process
        while len(self.read(mark)) < expect and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle)
        return self.read(mark)

    def body(self, seen: Seen) -> bytes:
        path = seen["body_file"]
        return Path(path).read_bytes() if path else b""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_nginx(directory: Path, *, answer: str | None = None, access_log: bool = True) -> Nginx:
    """nginx on a free loopback port, answering once it accepts connections.

    `answer` None: bodies are read and kept, the answer is `seen <target>`; else every request
    gets `answer` (nothing of the request echoed)."""
    if NGINX is None:
        raise FileNotFoundError("nginx is not installed (.ci/run installs Debian's package)")
    if os.geteuid() == 0:  # the workers run as the user: let them write their files
        directory.chmod(0o777)
    port, inner = _free_port(), _free_port()
    return run_nginx(directory, port, _conf(directory, port, inner, answer, access_log))


def run_nginx(directory: Path, port: int, text: str) -> Nginx:
    """nginx running the whole config `text` (see `main_conf`), once `port` accepts."""
    if NGINX is None:
        raise FileNotFoundError("nginx is not installed (.ci/run installs Debian's package)")
    if os.geteuid() == 0:
        directory.chmod(0o777)
    conf = directory / "nginx.conf"
    conf.write_text(text)
    errors = directory / "error.log"
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(conf), "-e", str(errors)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Nginx(f"http://127.0.0.1:{port}", directory, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                tail = errors.read_text()[-500:] if errors.exists() else ""
                raise RuntimeError(f"nginx did not start: {tail}") from None
            time.sleep(0.05)
