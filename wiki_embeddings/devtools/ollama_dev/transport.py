"""HTTP transport: a threading HTTP/1.1 server that reads whole bodies, streams answers and stops promptly.

It knows nothing of Ollama: every request goes to an :class:`App` (the routes), which answers a
:class:`~wiki_embeddings.devtools.ollama_dev.replies.Reply` and the trickle to send it with. What is
here is what a real socket needs: keep-alive framing (Content-Length or chunked request bodies),
chunked answers that may never end, byte-by-byte trickling, and closing every open connection when the
server stops, so hung clients see the socket close.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from wiki_embeddings.devtools.ollama_dev.replies import Reply, Stopping, error

CONTROL_PREFIX = "/_control"  # requests not counted in the stats


class App(Protocol):
    """What the transport asks of the application behind it."""

    def respond(self, method: str, path: str, body: bytes) -> tuple[Reply, float]:
        """The reply and the trickle (ms per byte, 0 for none) to send it with."""
        ...

    def count_request(self) -> None: ...

    def count_status(self, status: int) -> None: ...


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many pipeline connections may open at once; the default 5 drops SYNs

    def __init__(self, address: tuple[str, int], app: App, stop: threading.Event, verbose: bool = False) -> None:
        self.app = app
        self.stop = stop
        self.verbose = verbose
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on DNS; we do not need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Shut every open connection down (a stopping server must not leave clients waiting)."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def make_server(host: str, port: int, app: App, stop: threading.Event, verbose: bool = False) -> HTTPServer:
    """Bind ``host:port`` (IPv6 when ``host`` has a colon; port 0 picks one) for ``app``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("_BoundHTTPServer", (HTTPServer,), {"address_family": family})
    return server_cls((host, port), app, stop, verbose)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "ollama-devtools"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in two writes; avoid the Nagle stall
    server: HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def handle(self) -> None:
        # The client or stop() may close the socket under us; that is not an error worth a traceback.
        with contextlib.suppress(OSError, Stopping, ValueError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        if not getattr(self, "path", "").startswith(CONTROL_PREFIX):
            self.server.app.count_status(code)
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        """Read the whole request body (Content-Length or chunked) so keep-alive stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _send(self, reply: Reply, trickle_ms: float = 0.0) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.chunks is not None:
            self.send_header("Transfer-Encoding", "chunked")
            # The connection closes after a stream (_send_chunked): say so, or a keep-alive client reuses it and
            # its next request meets a closed socket ("server disconnected without sending a response").
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        stop = self.server.stop
        if reply.chunks is not None:
            self._send_chunked(reply, stop)
            return
        if trickle_ms <= 0:
            step = 1 << 16  # big bodies go out in pieces so a stop or a client hang-up ends them promptly
            for i in range(0, len(reply.body), step):
                if i and stop.is_set():
                    raise Stopping
                self.wfile.write(reply.body[i : i + step])
            return
        for i in range(len(reply.body)):
            if stop.wait(trickle_ms / 1000):
                raise Stopping
            self.wfile.write(reply.body[i : i + 1])

    def _send_chunked(self, reply: Reply, stop: threading.Event) -> None:
        self.close_connection = True  # an abandoned stream leaves the connection unusable anyway
        chunks = reply.chunks
        assert chunks is not None
        try:
            for chunk in itertools.chain((reply.body,), chunks):
                if stop.is_set():
                    raise Stopping
                if chunk:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            if stop.is_set():  # a body cut by the server stopping must not look complete
                raise Stopping
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        app = self.server.app
        path = urlsplit(self.path).path
        if not path.startswith(CONTROL_PREFIX):
            app.count_request()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(error(400, "invalid request body framing"))
            return
        reply, trickle = app.respond(self.command, path, body)
        self._send(reply, trickle)
