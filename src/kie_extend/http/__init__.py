"""The HTTP side, one stack (FastAPI on uvicorn): ``kie-extend serve`` runs KIE's callbacks, the
JSON API under ``/v1`` and the operator dashboard at ``/`` in one ASGI app (``--callbacks-only``:
the callbacks alone, as ``kie-extend callback-server`` does).

- ``app.py``: the app factory, error shape, ``/healthz``/``/livez``, ``/readyz``, ``/metrics``, ``/docs``
  (vendored Swagger UI), the 503 for an unavailable job store.
- ``callbacks.py``: the callback route ``POST /kie/callback/{job_id}`` and its pure parts (the
  task id in a body, the provider's HMAC signature).
- ``health.py``: the readiness check (job store and broker, bounded in time).
- ``auth.py``: bearer tokens from ``KIE_API_TOKENS`` and the tenants file (admin, or one tenant;
  ``read:`` prefix = read-only), compared in
  constant time; the dashboard's signed session cookie and CSRF tokens.
- ``api_v1.py``: the JSON API routes.
- ``dashboard.py``: the server-rendered dashboard (templates and vendored static files beside it);
  ``dashboard_data.py`` what its pages read; ``charts.py`` its SVG charts.
- ``limits.py``: what one request may cost (body size and time, header time, JSON depth).
- ``schemas.py``: the JSON API's request and response models, for its OpenAPI document.
"""
