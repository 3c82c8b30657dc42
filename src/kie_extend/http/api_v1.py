"""The JSON API under ``/v1`` (DESIGN §12). Every route needs a bearer token (``auth.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..api import get_job

router = APIRouter(prefix="/v1")


@router.get("/jobs/{job_id}")
def read_job(job_id: str, request: Request) -> Any:
    """One job's status record (DESIGN §5); 404 with ``state: not_found`` for an unknown id."""
    request.app.state.auth.from_request(request)
    rec = get_job(job_id, settings=request.app.state.settings)
    if rec["state"] == "not_found":
        from fastapi.responses import JSONResponse

        return JSONResponse({"job_id": job_id, "state": "not_found",
                             "error": {"kind": "not_found", "message": f"no job {job_id}"}}, status_code=404)
    return rec
