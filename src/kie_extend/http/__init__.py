"""The HTTP side: ``kie-extend serve`` runs the callback receiver, the JSON API under
``/v1`` and the operator dashboard at ``/`` in one ASGI app (FastAPI on uvicorn).

- ``app.py``: the app factory, error shape, ``/healthz``/``/livez``, ``/readyz``, ``/metrics``, ``/docs``
  (vendored Swagger UI), the callback route, the 503 for an unavailable job store.
- ``health.py``: the readiness check (job store and broker, bounded in time) and throttled warnings.
- ``auth.py``: bearer tokens from ``KIE_API_TOKENS`` (``read:`` prefix = read-only), compared in
  constant time; the dashboard's signed session cookie and CSRF tokens.
- ``api_v1.py``: the JSON API routes.
- ``dashboard.py``: the server-rendered dashboard (templates and vendored static files beside it);
  ``dashboard_data.py`` what its pages read; ``charts.py`` its SVG charts.
"""
