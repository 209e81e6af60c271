"""Prometheus metrics of the attribution workers, and the HTTP endpoints that serve them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from attribution.engine import BatchResult

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS = Counter("fission_events_total", "Events processed, by type, outcome and rejection reason",
                 ["type", "outcome", "reason"])
DEAD_LETTERS = Counter("fission_dead_letters_total", "Events sent to the dead-letter topic, by reason", ["reason"])
CREDITS = Counter("fission_credits_total", "Ledger entries made, by campaign and kind", ["campaign", "kind"])
CREDIT_AMOUNT = Counter("fission_credit_amount_total", "Sum of credited amounts (minor units)", ["campaign", "kind"])
BUDGET_CUT = Counter("fission_budget_exhausted_total", "Credits not made because the budget ran out", ["campaign"])
BATCH_SIZE = Histogram("fission_batch_size", "Events per processed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_SECONDS = Histogram("fission_batch_seconds", "Time to process and commit one batch", buckets=LATENCY_BUCKETS)
FETCH_ROUNDS = Histogram("fission_fetch_rounds", "Store round trips a batch needed", buckets=(1, 2, 3, 4, 6, 10))
CREDIT_LATENCY = Histogram("fission_event_to_credit_seconds",
                           "Event time to credit visible in the store (end-to-end)", buckets=LATENCY_BUCKETS)
WAITING = Gauge("fission_waiting_events", "Events waiting for a share that is not recorded yet", ["partition"])
LAG = Gauge("fission_consumer_lag", "Messages behind the end of the input partition", ["partition"])
ASSIGNED = Gauge("fission_assigned_partitions", "Input partitions this worker owns")
STORE_ERRORS = Counter("fission_store_errors_total", "Store failures (the batch is retried)", ["kind"])


def observe(result: BatchResult, started: float, now_ms: int) -> None:
    """Record one committed batch."""
    for outcome in result.outcomes:
        EVENTS.labels(outcome.type or "invalid", outcome.outcome, outcome.reason or "").inc()
        if outcome.budget_exhausted:
            BUDGET_CUT.labels(outcome.campaign).inc(len(outcome.budget_exhausted))
    for letter in result.dead_letters:
        DEAD_LETTERS.labels(letter.reason).inc()
    for entry in result.entries:
        CREDITS.labels(entry.campaign, entry.kind).inc()
        CREDIT_AMOUNT.labels(entry.campaign, entry.kind).inc(max(entry.amount, 0))
        CREDIT_LATENCY.observe(max(0.0, (now_ms - entry.ts) / 1000))
    BATCH_SIZE.observe(len(result.outcomes))
    BATCH_SECONDS.observe(time.perf_counter() - started)
    FETCH_ROUNDS.observe(result.fetch_rounds)


def serve(port: int, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """`/metrics` (Prometheus), `/health` (the process answers) and `/ready` (it owns partitions
    and its store answers), on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/health":
                self._send(200, b"ok\n")
            elif self.path == "/ready":
                is_ready = ready()
                self._send(200 if is_ready else 503, b"ready\n" if is_ready else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
