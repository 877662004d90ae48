"""Run a server on the loopback interface in a background thread (tests, the load test, the demo
page check): ``with on_loopback(app) as url: ...`` — bound to 127.0.0.1 on a free port, stopped on exit;
and :func:`send_requests`, the load test's clients (run in a process of their own)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence

from mmlora.optional import require


@contextlib.contextmanager
def on_loopback(app, timeout: float = 30.0) -> Iterator[str]:
    uvicorn = require("uvicorn", "serve", "serving on the loopback interface")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mmlora-loopback", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()


def send_requests(url: str, plan: Sequence[tuple], send_budget: bool, clients: int, max_seconds: float, conn) -> None:
    """(A process of its own, ``conn`` its end of a pipe.) Once told ``go``, ``clients`` threads send
    ``plan``'s ``(adapter, max_new_tokens, png bytes)`` caption requests to ``url`` until all are sent or
    ``max_seconds`` pass; sends back (latencies in ms of the answered ones, statuses, wall seconds)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    queue = list(plan)
    conn.send("ready")
    assert conn.recv() == "go"
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max_seconds) as c:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    adapter, budget, png = queue.pop()
                form = {"adapter": adapter} | ({"max_new_tokens": budget} if send_budget else {})
                t0 = time.perf_counter()
                r = c.post("/caption", data=form, files={"image": ("x.png", png, "image/png")})
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(1000 * (time.perf_counter() - t0))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send((latencies, statuses, time.perf_counter() - start))
