"""A hostile client against ``kie-extend serve`` and the producers, on real processes.

Forwarded-address headers are believed only from named proxies (so the failed-authentication limit
cannot be rotated around), forged callbacks never make us poll a task faster than the provider
allows, text rules apply to the pause reason, idempotency keys are checked inside one request and
compare numbers by value, duplicate JSON keys are refused, and a body is bounded on routes that
never read one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from test_http_edge import READ, WRITE, Server, start  # noqa: F401  (fixture)


def test_forwarded_for_is_ignored_unless_the_proxy_is_named(start: Callable[..., Server]) -> None:
    """A client rotating X-Forwarded-For is still one address: 20 wrong tokens, then 429. Behind a
    named proxy the forwarded address is the client's, so another forwarded client is unaffected."""
    server = start(KIE_API_TOKENS=f"{WRITE},read:{READ}")
    statuses = [server.request("GET", "/v1/system", headers={"Authorization": f"Bearer wrong-{i}",
                                                           "X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"})[0]
                for i in range(25)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    # Nor can a forged header lock another address out: 127.0.0.2 still gets in.
    assert server.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}"},
                          source="127.0.0.2")[0] == 200

    proxied = start(KIE_API_TOKENS=f"{WRITE},read:{READ}", KIE_HTTP_TRUSTED_PROXIES="127.0.0.1")
    for i in range(25):
        status = proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer wrong-{i}",
                                                              "X-Forwarded-For": "10.9.9.9"})[0]
        assert status == (401 if i < 20 else 429)
    assert proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}",
                                                         "X-Forwarded-For": "10.8.8.8"})[0] == 200
    # A peer that is not the named proxy is itself the client, whatever it forwards.
    for i in range(21):
        status = proxied.request("GET", "/v1/system", source="127.0.0.3",
                                 headers={"Authorization": f"Bearer w-{i}", "X-Forwarded-For": f"10.1.1.{i}"})[0]
    assert status == 429
    assert json.loads(proxied.request("GET", "/v1/system", headers={"Authorization": f"Bearer {READ}"})[2])
