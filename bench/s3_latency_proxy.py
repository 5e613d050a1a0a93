"""A tiny HTTP reverse proxy that adds a fixed delay to every request, to model real S3 latency
in front of a local S3 server (moto).

Real S3 answers a small GET in tens of milliseconds; a server on loopback answers in about one.
The proxy sleeps ``delay_s`` and then forwards the request verbatim (method, path, query, headers
including ``Authorization``/``x-amz-*``, body) to the upstream server and streams the response back,
so boto3 and pyarrow both work through it unchanged (point ``AWS_ENDPOINT_URL`` at the proxy).

Decisions:
- ``ThreadingHTTPServer`` with daemon threads and HTTP/1.1 keep-alive: one thread per client
  connection, so many concurrent clients each see the delay once per request, in parallel (that is
  what a high-latency, high-bandwidth store looks like). Listen backlog is large so bursts of new
  connections are not dropped (the default of 5 turns into 1 s SYN retries).
- One persistent upstream connection per client connection (the handler thread owns it), reopened
  once if the upstream closed an idle keep-alive connection.
- ``Expect: 100-continue`` is answered by the proxy itself (``BaseHTTPRequestHandler`` does it for
  HTTP/1.1) and not forwarded, since the whole body is read before forwarding. Hop-by-hop headers
  are dropped; everything else, including ``Host`` (it is part of the SigV4 signature), is kept.

- Throttling (``slowdown`` share, 0 by default): that share of object GETs (``GET /bucket/key``,
  not listings) is answered by the proxy itself, after the delay, with S3's ``503 SlowDown`` error,
  the answer S3 gives when a prefix is over its request rate. The draw is random (seeded), so it
  models occasional throttling, not a hard rate limit. The share can be changed while the proxy
  runs with ``PUT /__proxy__/config?slowdown=0.05``; ``GET /__proxy__/stats`` returns the counts
  (JSON). Bucket names cannot contain ``_``, so these paths never shadow a real request.

Run standalone: ``python -m bench.s3_latency_proxy --upstream http://127.0.0.1:5000 --port 5001
[--slowdown 0.05]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# Hop-by-hop headers (RFC 9110 7.6.1) plus Expect, which the proxy answers itself.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_CHUNK = 64 * 1024
_CONTROL = "/__proxy__/"
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    # One upstream connection per client connection (this handler instance lives as long as it).
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def _read_body(self) -> tuple[bytes, bool]:
        """The request body exactly as sent; returns (raw bytes, is_chunked)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline()
                parts.append(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        trailer = self.rfile.readline()
                        parts.append(trailer)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    return b"".join(parts), True
                parts.append(self.rfile.read(size + 2))  # data + CRLF
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else b""), False

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    self.server.upstream_host, self.server.upstream_port, timeout=self.server.timeout_s
                )
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.endheaders(body if body else None)
                return conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                # The upstream dropped an idle keep-alive connection: reconnect once.
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_simple(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _control(self) -> None:
        """``PUT /__proxy__/config?slowdown=S`` sets the SlowDown share; ``GET /__proxy__/stats``."""
        url = urlparse(self.path)
        if self.command == "PUT" and url.path == _CONTROL + "config":
            share = float(parse_qs(url.query).get("slowdown", ["0"])[0])
            if not 0.0 <= share <= 1.0:
                self._send_simple(400, b"slowdown must be in [0, 1]", "text/plain")
                return
            self.server.set_slowdown(share)
        self._send_simple(200, json.dumps(self.server.stats()).encode(), "application/json")

    def _proxy(self) -> None:
        body, _ = self._read_body()
        if self.path.startswith(_CONTROL):
            self._control()
            return
        if self.server.delay_s > 0:
            time.sleep(self.server.delay_s)
        if self.command == "GET" and self.server.throttle(urlparse(self.path).path):
            self._send_simple(503, _SLOWDOWN_BODY, "application/xml")
            return
        try:
            resp = self._forward(body)
        except OSError as e:
            self.send_error(502, f"upstream unreachable: {e}")
            return
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        # http.client removes chunked framing; re-frame only if the upstream gave no length.
        rechunk = length is None and self.command != "HEAD" and resp.status not in (204, 304)
        for name, value in resp.getheaders():
            low = name.lower()
            if low in _HOP_BY_HOP or low == "transfer-encoding":
                continue
            self.send_header(name, value)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            data = resp.read(_CHUNK)
            if not data:
                break
            if rechunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if resp.will_close and self._upstream is not None:
            # The upstream closes after this response; keep the client connection, reconnect next time.
            self._upstream.close()
            self._upstream = None
        if self.headers.get("Connection", "").lower() == "close":
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _proxy


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, upstream: str, delay_s: float, timeout_s: float = 60.0, slowdown: float = 0.0,
                 seed: int = 0):
        super().__init__(addr, _Handler)
        parsed = urlparse(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._slowdown = slowdown
        self._object_gets = 0
        self._slowdowns = 0

    def set_slowdown(self, share: float) -> None:
        with self._lock:
            self._slowdown = share

    def throttle(self, path: str) -> bool:
        """Whether to answer this GET with SlowDown; only object GETs (a key after the bucket) count."""
        if "/" not in path.strip("/"):
            return False
        with self._lock:
            self._object_gets += 1
            hit = self._slowdown > 0 and self._rng.random() < self._slowdown
            self._slowdowns += hit
            return hit

    def stats(self) -> dict:
        with self._lock:
            return {"slowdown": self._slowdown, "object_gets": self._object_gets, "slowdowns": self._slowdowns}


class LatencyProxy:
    """Start/stop a latency-adding proxy in a background thread of this process.

    >>> with LatencyProxy("http://127.0.0.1:5000", delay_ms=20) as proxy:
    ...     os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    """

    def __init__(self, upstream: str, delay_ms: float = 20.0, host: str = "127.0.0.1", port: int = 0,
                 slowdown: float = 0.0):
        self._server = _ProxyServer((host, port), upstream, delay_ms / 1000.0, slowdown=slowdown)
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-latency-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_slowdown(self, share: float) -> None:
        """Answer this share of object GETs with 503 SlowDown from now on."""
        self._server.set_slowdown(share)

    def stats(self) -> dict:
        return self._server.stats()

    def start(self) -> LatencyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--slowdown", type=float, default=0.0, help="share of object GETs answered 503 SlowDown")
    args = p.parse_args(argv)
    if not 0.0 <= args.slowdown <= 1.0:
        p.error("--slowdown must be between 0 and 1")
    server = _ProxyServer((args.host, args.port), args.upstream, args.delay_ms / 1000.0, slowdown=args.slowdown)
    host, port = server.server_address[:2]
    print(f"http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
