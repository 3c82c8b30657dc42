"""Serve an HTTP app (``kie_extend.http.app``) with uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
import uvicorn

from kie_extend.infra.embedded import free_port


class ServedApp:
    """A running uvicorn server for ``app``; ``url`` is its base URL; ``stop()`` ends it."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="info", access_log=True, log_config=None,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/healthz", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError("the dashboard app did not start")

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(10)
