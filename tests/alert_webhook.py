"""A webhook receiver for Alertmanager: an HTTP server that records every notification it is sent.

Alertmanager's webhook (payload version 4) POSTs one JSON object per notification: the group's `status`,
`receiver`, `groupLabels`, and `alerts`, each with its own `status` ("firing" or "resolved"), `labels`,
`annotations`, `startsAt` and `endsAt`.

In tests::

    with WebhookReceiver() as hook:           # 127.0.0.1, a free port
        ...point an Alertmanager receiver at hook.url + "/alerts/growth"...
        alert = hook.wait_for(lambda a: a["labels"]["alertname"] == "StalledCascade", timeout=60)

By hand, to see what `scripts/services` Alertmanager sends (its receivers post to
FISSION_ALERT_WEBHOOK_URL + /alerts/<audience>)::

    python -m tests.alert_webhook --port 5001     # prints one JSON line per notification
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Alert = dict[str, Any]


class WebhookReceiver:
    """Records notifications as `posts` (each the JSON body plus the request `path`), on a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, echo: bool = False) -> None:
        self.posts: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    post = json.loads(body)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                post["path"] = self.path
                receiver.record(post)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.echo = echo
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="alert-webhook")

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, post: dict[str, Any]) -> None:
        with self.changed:
            self.posts.append(post)
            self.changed.notify_all()
        if self.echo:
            print(json.dumps(post, sort_keys=True), flush=True)

    def alerts(self) -> list[Alert]:
        """Every alert of every notification so far, in arrival order, each with the notification's
        `receiver` and `path` added."""
        with self.changed:
            return [{**alert, "receiver": post.get("receiver"), "path": post["path"]}
                    for post in self.posts for alert in post.get("alerts", [])]

    def wait_for(self, match: Callable[[Alert], bool], timeout: float) -> Alert | None:
        """The first alert (of any notification, past or future) that `match`es, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = next((alert for alert in self.alerts() if match(alert)), None)
                remaining = deadline - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self.changed.wait(remaining)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the notifications an Alertmanager webhook receives.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    receiver = WebhookReceiver(args.host, args.port, echo=True).start()
    print(f"listening on {receiver.url}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
