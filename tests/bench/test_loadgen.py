"""The load generator against a loopback stub: rejections are counted apart, and clients
that honour Retry-After send far fewer requests than clients that retry at once."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import Body, closed_loop


class ShedEveryOther(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            ShedEveryOther.count += 1
            shed = ShedEveryOther.count % 2 == 0
        body = b'{"error": "overloaded"}' if shed else b"{}"
        self.send_response(503 if shed else 200)
        if shed:
            self.send_header("Retry-After", "0.5")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ShedEveryOther)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rejections_are_counted_and_retry_after_is_honoured(stub_url):
    bodies = [Body(b"x" * 100, "image/png")]
    patient = closed_loop(stub_url, "/p", bodies, 2, 1.0, warmup_s=0.0)
    impatient = closed_loop(stub_url, "/p", bodies, 2, 1.0, warmup_s=0.0, honour_retry_after=False)
    for run in (patient, impatient):
        assert run["rejected"] == run["errors"] > 0
        assert abs(run["requests"] - 2 * run["rejected"]) <= 2  # every other one is shed
    assert patient["requests"] <= 12  # each worker waits 0.5 s after every other request
    assert impatient["requests"] > 3 * patient["requests"]
