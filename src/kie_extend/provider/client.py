"""KIE provider client: plain HTTP on urllib3's connection pool or a ``requests.Session``; knows nothing of Celery or Redis.

Our own session's submit and poll calls go straight to urllib3's pool (what requests sends through),
without requests' per-request preparation; a session passed in, a proxy or client certificate from
the environment, and other calls (file uploads) use requests itself. Errors are classified the same
way on both paths.

Usable from a REPL against the simulator::

    >>> c = KieClient("http://127.0.0.1:8787", "test-key")
    >>> task_id = c.submit_extend({...})
    >>> c.record_info(task_id).status
    'PENDING'
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
import urllib3
from requests.exceptions import ChunkedEncodingError, ConnectTimeout, ReadTimeout
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.utils import DEFAULT_CA_BUNDLE_PATH, extract_zipped_paths
from urllib3 import exceptions as u3exc

from kie_extend.errors import (
    EDGE_STATUSES,
    ConnectError,
    EdgeError,
    OutcomeUnknownError,
    ProviderCodeError,
    TransportError,
    UnavailableError,
    error_for_code,
)
from kie_extend.provider.operations import StepRecord, operation, parse_lyrics, parse_step_record

log = logging.getLogger(__name__)

#: Browser-like User-Agent: the provider's CDN answers 403 "error code: 1010" to bare library agents.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) kie-extend/0.1 (+https://pypi.org/project/kie-extend)"

SUBMIT_PATH = "/api/v1/generate/upload-extend"
RECORD_PATH = "/api/v1/generate/record-info"
CREDIT_PATH = "/api/v1/chat/credit"

#: Record-info statuses after which the task never changes.
SUCCESS_STATUS = "SUCCESS"
FAILED_STATUSES = frozenset(
    {"CREATE_TASK_FAILED", "GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR", "CALLBACK_EXCEPTION"}
)


#: What ``retries=False, redirect=False`` becomes inside urllib3 on every request, built once
#: (a Retry is never changed in place: urllib3 makes a new one per attempt).
_NO_RETRY = urllib3.Retry(False, redirect=False)


def _pick(item: dict[str, Any], *names: str) -> Any:
    """First non-empty value among spellings (camelCase from polls, snake_case from callbacks)."""
    for name in names:
        value = item.get(name)
        if value not in (None, ""):
            return value
    return None


def parse_track(item: dict[str, Any]) -> dict[str, Any]:
    """One take in our shape, from either the camelCase (poll) or snake_case (callback) spelling."""
    duration = _pick(item, "duration")
    try:
        duration = float(duration) if duration is not None else None
    except (TypeError, ValueError):
        duration = None
    return {
        "id": _pick(item, "id") or "",
        "audio_url": _pick(item, "audioUrl", "audio_url") or "",
        "stream_audio_url": _pick(item, "streamAudioUrl", "stream_audio_url") or "",
        "source_audio_url": _pick(item, "sourceAudioUrl", "source_audio_url") or "",
        "source_stream_audio_url": _pick(item, "sourceStreamAudioUrl", "source_stream_audio_url") or "",
        "image_url": _pick(item, "imageUrl", "image_url") or "",
        "title": _pick(item, "title") or "",
        "tags": _pick(item, "tags") or "",
        "duration": duration,
        "model_name": _pick(item, "modelName", "model_name") or "",
        "prompt": _pick(item, "prompt") or "",
        "create_time": _pick(item, "createTime", "create_time"),
    }


def track_has_audio(track: dict[str, Any]) -> bool:
    """Whether a take carries any usable audio URL."""
    return any(track.get(k) for k in ("audio_url", "source_audio_url", "stream_audio_url", "source_stream_audio_url"))


@dataclass
class TaskRecord:
    """What record-info says about a task, parsed tolerantly."""

    task_id: str
    status: str
    tracks: list[dict[str, Any]] = field(default_factory=list)
    error_code: int | None = None
    error_message: str | None = None
    param: dict[str, Any] | None = None
    #: What the provider says the task cost (``creditsConsumed``, createTask route), once it ended;
    #: None where the route does not say.
    credits_consumed: float | None = None

    @property
    def finished(self) -> bool:
        """Whether the status is terminal (known terminal, or an unknown one naming a failure)."""
        return self.status == SUCCESS_STATUS or self.failed

    @property
    def failed(self) -> bool:
        """Whether the status is a failure; unknown statuses with FAIL/ERROR count as failures."""
        if self.status in FAILED_STATUSES:
            return True
        return self.status != SUCCESS_STATUS and ("FAIL" in self.status or "ERROR" in self.status)


def parse_record(data: dict[str, Any]) -> TaskRecord:
    """A TaskRecord from record-info's ``data`` object (tolerant of drift)."""
    response = data.get("response")
    items: Any = []
    if isinstance(response, dict):
        items = response.get("sunoData") or response.get("data") or []
    if not isinstance(items, list):
        items = []
    param = data.get("param")
    if isinstance(param, str):
        try:
            param = json.loads(param)
        except ValueError:
            param = None
    code = data.get("errorCode")
    try:
        code = int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        code = None
    return TaskRecord(
        task_id=str(data.get("taskId") or ""),
        status=str(data.get("status") or "PENDING").upper(),
        tracks=[parse_track(i) for i in items if isinstance(i, dict)],
        error_code=code,
        error_message=data.get("errorMessage"),
        param=param if isinstance(param, dict) else None,
    )


class KieClient:
    """Typed access to the provider's legacy Upload-And-Extend routes."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.session = session or requests.Session()
        self.timeout = (connect_timeout, read_timeout)
        #: Proxies and CA bundle from the environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE…),
        #: read once for our own session: requests would read them again on every request (a scan
        #: of the whole environment and ~/.netrc), which costs more CPU than the request itself.
        self._env: dict[str, Any] = {}
        self._own_session = session is None
        #: urllib3's pool for requests sent without requests' per-request work (see :meth:`_fast`):
        #: our own session, no proxy and no client certificate from the environment.
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._timeouts: dict[tuple[float, float], urllib3.Timeout] = {}
        if session is None:
            env = self.session.merge_environment_settings(self.base_url, {}, None, None, None)
            self._env = {"proxies": env["proxies"], "verify": env["verify"], "cert": env["cert"]}
            self.session.trust_env = False
            if not env["proxies"] and not env["cert"] and env["verify"] is not False:
                self._pool = _pool_manager(env["verify"]).connection_from_url(self.base_url)
                self._base_path = urlsplit(self.base_url).path
                self._fast_headers = {**self.session.headers, **self._headers()}

    def __repr__(self) -> str:
        return f"KieClient({self.base_url!r})"

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def _call(self, method: str, path: str, *, timeout: tuple[float, float] | None = None, **kwargs: Any) -> Any:
        """Send one request and return the envelope's ``data``; raise the typed error otherwise.
        ``timeout``: (connect, read) seconds instead of the client's own."""
        url = self.base_url + path
        if self._pool is not None and kwargs.keys() <= {"data", "params"} and \
                isinstance(kwargs.get("data"), (str, type(None))):
            status, reason, content = self._fast(method, url, timeout or self.timeout, kwargs.get("data"),
                                                 kwargs.get("params"))
            return _envelope(status, reason, content)
        try:
            resp = self._send(method, url, timeout or self.timeout, **kwargs)
        except ConnectTimeout as exc:
            raise ConnectError(f"connect timeout to {self.base_url}") from exc
        except ReadTimeout as exc:
            raise OutcomeUnknownError(f"read timeout from {self.base_url}{path}") from exc
        except ChunkedEncodingError as exc:
            raise OutcomeUnknownError(f"connection dropped mid-answer from {self.base_url}{path}") from exc
        except RequestsConnectionError as exc:
            raise _classify_connection_error(exc, self.base_url + path) from exc
        except requests.RequestException as exc:
            raise ConnectError(f"{type(exc).__name__} for {self.base_url}{path}") from exc
        return _envelope_data(resp)

    def _send(self, method: str, url: str, timeout: tuple[float, float], **kwargs: Any) -> requests.Response:
        """One request on the session (requests' exceptions pass through). Our own session's request is
        prepared here with its headers and cookies and sent as ``Session.request`` would, without
        merging the session's (empty) settings and the environment's again on every call."""
        if not self._own_session:  # a session the caller passed in: requests' own way, its settings honoured
            return self.session.request(method, url, headers=self._headers(), timeout=timeout, **kwargs)
        # Query parameters go in as text (requests takes text as it is): a mapping, or none at all,
        # costs requests several runtime Protocol checks per request.
        params = kwargs.pop("params", None)
        kwargs["params"] = urlencode(params, doseq=True) if isinstance(params, dict) else (params or "")
        prepared = requests.Request(method, url, headers={**self.session.headers, **self._headers()},
                                    cookies=self.session.cookies, **kwargs).prepare()
        return self.session.send(prepared, timeout=timeout, allow_redirects=True, **self._env)

    def _fast(self, method: str, url: str, timeout: tuple[float, float], data: str | None,
              params: dict[str, Any] | None) -> tuple[int, str, bytes]:
        """One request straight on urllib3's connection pool (what requests itself sends through),
        without requests' per-request preparation: ``(status, reason, body)``. The same headers, timeouts,
        certificate checks and keep-alive as the requests path; transport errors are classified as
        :meth:`_call` classifies requests' (sent or not), never as "not sent" when it may have been."""
        assert self._pool is not None
        path = url[len(self.base_url):]
        target = self._base_path + path
        if params:
            target = f"{target}?{urlencode(params, doseq=True)}"
        body = data.encode("utf-8") if data is not None else None
        u3timeout = self._timeouts.get(timeout)
        if u3timeout is None:  # built once per (connect, read) pair: urllib3 clones it per request
            u3timeout = self._timeouts[timeout] = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        try:
            resp = self._pool.urlopen(method, target, body=body, headers=self._fast_headers, retries=_NO_RETRY,
                                      redirect=False, timeout=u3timeout, preload_content=False)
        except u3exc.NewConnectionError as exc:  # refused, unreachable, DNS: nothing was sent
            raise _classify_connection_error(exc, url) from exc
        except u3exc.ConnectTimeoutError as exc:
            raise ConnectError(f"connect timeout to {self.base_url}") from exc
        except u3exc.ReadTimeoutError as exc:
            raise OutcomeUnknownError(f"read timeout from {self.base_url}{path}") from exc
        except (u3exc.SSLError, u3exc.ProxyError, u3exc.LocationValueError) as exc:
            raise ConnectError(f"{type(exc).__name__} for {self.base_url}{path}") from exc
        except (u3exc.HTTPError, OSError) as exc:
            # Dropped, reset or anything else once the request may have left: classified by its text
            # like requests' ConnectionError (a refused connect is "not sent", the rest "may have been").
            raise _classify_connection_error(exc, url) from exc
        try:
            content = resp.data
        except u3exc.ReadTimeoutError as exc:
            raise OutcomeUnknownError(f"read timeout from {self.base_url}{path}") from exc
        except (u3exc.HTTPError, OSError) as exc:
            raise OutcomeUnknownError(f"connection dropped mid-answer from {self.base_url}{path}") from exc
        finally:
            resp.release_conn()
        return resp.status, resp.reason or "", content

    def submit_extend(self, body: dict[str, Any]) -> str:
        """POST upload-extend; the provider's ``taskId`` on success."""
        data = self._call("POST", SUBMIT_PATH, data=json.dumps(body))
        task_id = (data or {}).get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise UnavailableError(500, "success answer without taskId")
        return str(task_id)

    def record_info(self, task_id: str) -> TaskRecord:
        """GET record-info for one task."""
        data = self._call("GET", RECORD_PATH, params={"taskId": task_id})
        if not isinstance(data, dict):
            raise ProviderCodeError(422, "recordInfo is null")
        return parse_record(data)

    def submit_step(self, op: str, body: dict[str, Any]) -> str:
        """POST a follow-up's submit (``provider/operations.py``); the new task's ``taskId``.

        Raises the error tree's provider errors; a duplicate WAV or video answers 409 (RejectedError,
        ``code == 409``): the first task stands and must not be paid again."""
        data = self._call("POST", operation(op).submit_path, data=json.dumps(body))
        task_id = (data or {}).get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise UnavailableError(500, f"{op} answer without taskId")
        return str(task_id)

    def step_record(self, op: str, task_id: str) -> StepRecord:
        """GET a follow-up's record; its state and result in our shape."""
        entry = operation(op)
        if entry.record_path is None:
            raise ValueError(f"{op} is synchronous: it has no record")
        data = self._call("GET", entry.record_path, params={"taskId": task_id})
        if not isinstance(data, dict):
            raise ProviderCodeError(422, f"{op} record is null")
        return parse_step_record(entry, data)

    def timestamped_lyrics(self, task_id: str, audio_id: str) -> dict[str, Any]:
        """POST get-timestamped-lyrics (synchronous): ``{"aligned_words": [...]}``."""
        entry = operation("lyrics")
        data = self._call("POST", entry.submit_path, data=json.dumps({"taskId": task_id, "audioId": audio_id}))
        return parse_lyrics(data)

    def credits(self, timeout: tuple[float, float] | None = None) -> float:
        """GET the remaining credit balance (free; the probe that ends a pause). ``timeout``:
        (connect, read) seconds instead of the client's own (a probe keeps it short)."""
        data = self._call("GET", CREDIT_PATH, timeout=timeout)
        try:
            return float(data)
        except (TypeError, ValueError):
            raise UnavailableError(500, "credit answer without a number") from None


def _classify_connection_error(exc: Exception, where: str) -> TransportError:
    """Connect failures never reached the provider; drops after sending may have."""
    text = repr(exc)
    never_sent = ("NewConnectionError", "NameResolution", "Connection refused", "SSLError", "ProxyError")
    if any(marker in text for marker in never_sent):
        parts = urlsplit(where)
        return ConnectError(f"could not connect to {parts.scheme}://{parts.netloc}")
    return OutcomeUnknownError(f"connection dropped after sending to {where}")


def _pool_manager(verify: Any) -> urllib3.PoolManager:
    """urllib3's pool as requests' HTTPAdapter builds it (10 pools of 10 connections), checking
    certificates against ``verify``: True (certifi's bundle, requests' default), a file or a directory."""
    ca: dict[str, Any] = {}
    where = extract_zipped_paths(DEFAULT_CA_BUNDLE_PATH) if verify is True else str(verify)
    ca["ca_cert_dir" if os.path.isdir(where) else "ca_certs"] = where
    return urllib3.PoolManager(num_pools=10, maxsize=10, cert_reqs="CERT_REQUIRED", **ca)


def _envelope_data(resp: requests.Response) -> Any:
    """:func:`_envelope` of a requests response."""
    return _envelope(resp.status_code, resp.reason or "", resp.content, resp.text)


def _envelope(status: int, reason: str, content: bytes, text: str | None = None) -> Any:
    """Read the JSON envelope (``content``: the body; ``text``: the same decoded, when known): body
    ``code`` wins, HTTP status when the body has none (an edge's 5xx without the envelope raises
    EdgeError)."""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or "code" not in body:
        if text is None:
            text = content.decode("utf-8", "replace")
        if status == 200:
            raise UnavailableError(502, "answer without a JSON envelope")
        if status == 403:
            raise error_for_code(403, (text or "")[:200])
        if status in EDGE_STATUSES:
            # A proxy or CDN in front of KIE answered for it: KIE itself was not reached (or did
            # not answer in time). The status line is enough; an HTML error page is not kept.
            raise EdgeError(status, f"HTTP {status} from an edge in front of KIE ({reason or 'no reason'})")
        raise error_for_code(status, (text or "")[:200] if body is None else str(body)[:200])
    try:
        code = int(body.get("code"))
    except (TypeError, ValueError):
        code = status
    if code == 200 and status >= 400:
        code = status
    if code != 200:
        raise error_for_code(code, str(body.get("msg") or ""))
    return body.get("data")
