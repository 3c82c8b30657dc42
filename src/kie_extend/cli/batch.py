"""``kie-extend batch``: a file of requests in as one batch, live progress, one results file out.

File formats (one job per line; every problem is reported as ``line N: field: message`` before
anything is uploaded or enqueued):

* **JSONL** (``.jsonl``, ``.ndjson``, or a file whose first character is ``{``): each non-blank line
  is one KIE request object in KIE's camelCase, with any of :data:`LINE_KEYS` beside the request
  fields (``{"uploadUrl": …, "model": "V5", …, "tenant": "shop", "metadata": {…}}``). The
  ``enqueue_many`` item shape, ``{"request": {…}, "tenant": …}``, is read too.
* **CSV** (``.csv``, or anything else): a header row, then one column per request field and any of
  :data:`LINE_KEYS`. An empty cell is an absent field. ``defaultParamFlag`` and ``instrumental``
  take true/false/1/0/yes/no, ``continueAt`` and the weights are numbers, ``priority`` an integer,
  ``metadata`` a JSON object; every other cell is text.

Line numbers are the file's own (in a CSV the header is line 1). Line ``N`` of batch ``B`` becomes
job ``B-N`` (``b<hash of B>-N`` when that is not a valid job id), with idempotency key ``B:N``
unless the line gives its own. Running the same command again after a crash or Ctrl-C therefore
sends nothing twice: a job that exists is skipped, a job whose message an earlier run published
(its id's claim is marked sent, see jobs/idempotency.py) is skipped even before a worker recorded it,
and a message sent twice for the same job id is a redelivery to the worker. ``audio_file`` paths are relative to the batch file's directory.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from kie_extend.cli.errors import (EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OK, EXIT_PROVIDER,
                         EXIT_TIMEOUT, EXIT_USAGE, InputError)
from kie_extend.errors import ConfigError, ValidationError
from kie_extend.infra.fileio import atomic_file
from kie_extend.jobs.intake import JOB_ID_PATTERN, Intake, check_options, near_miss
from kie_extend.infra.jsontext import DuplicateKeyError, loads_unique
from kie_extend.jobs.request import ExtendRequest
from kie_extend.jobs.states import TERMINAL

#: Keys a line may carry beside the request fields: extend kwargs (idempotency, metadata, sharing options) and a local file.
LINE_KEYS: tuple[str, ...] = ("tenant", "priority", "not_after", "metadata", "idempotency_key", "audio_file", "steps",
                              "takes")
#: The options a line gives or the command line gives for every line that lacks them.
OPTION_KEYS: tuple[str, ...] = ("tenant", "priority", "not_after", "steps", "takes")
#: Keys ``batch submit`` sets itself; a line that gives them is refused.
OWN_KEYS: tuple[str, ...] = ("job_id", "batch_id")
#: Lines per ``enqueue_many`` call; an interrupted run loses at most one chunk's progress, a re-run resumes.
CHUNK = 500
#: Seconds between plain progress lines when stdout is not a terminal.
PLAIN_INTERVAL = 5.0
#: Columns of ``batch results``, in order.
RESULT_COLUMNS: tuple[str, ...] = ("job_id", "line", "state", "error_kind", "error_message", "tracks",
                                   "audio_urls", "files", "kie_task_id", "steps")
#: Exit codes of ``batch status`` (and ``batch submit --wait``): the CLI's table (:mod:`kie_extend.cli.errors`).
EXIT_INVALID = EXIT_USAGE

Format = Literal["jsonl", "csv"]

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_DONE = frozenset({s.value for s in TERMINAL} | {"duplicate"})
_STATE_ORDER = ("pending", "queued", "submitting", "submitted", "succeeded", "failed", "cancelled", "duplicate")


def _field_kinds() -> dict[str, type]:
    """Request field -> ``bool``, ``float`` or ``str``, read from the request model (one source of truth)."""
    kinds: dict[str, type] = {}
    for name, info in ExtendRequest.model_fields.items():
        args = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
                for a in (typing.get_args(info.annotation) or (info.annotation,))]
        kinds[name] = bool if bool in args else float if float in args else str
    return kinds


#: How a CSV cell of each request field is read.
FIELD_KINDS: dict[str, type] = _field_kinds()


class BatchFileError(InputError):
    """The batch file cannot be read at all (missing, not UTF-8, no header); no line was looked at."""


@dataclass
class Line:
    """One job line of a batch file: its 1-based line number, request, extend kwargs, reading problems."""

    line: int
    request: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    #: True for a CSV header's own problems: a line with no job.
    header: bool = False
    #: Keys that are neither request fields nor options: sent to KIE as they are, with a warning.
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """One problem found in a batch file; ``line`` is None for the command line or the file as a whole."""

    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        return f"{'line ' + str(self.line) if self.line is not None else 'file'}: {self.field}: {self.message}"


# -- reading files ------------------------------------------------------------------------------

def detect_format(name: str, text: str) -> Format:
    """``jsonl`` for ``.jsonl``/``.ndjson``/``.json`` names or text starting with ``{``; else ``csv``."""
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def decode(data: bytes) -> str:
    """The file's text (UTF-8, a byte-order mark dropped); BatchFileError when it is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def unknown_key(name: str, what: str) -> tuple[str | None, dict[str, str] | None]:
    """How a key that is not a field of the KIE request is taken: ``(warning, None)`` for a key
    sent to KIE as it is (KIE may know fields this version does not), ``(None, problem)`` for a
    near miss of an option (``idempotencyKey``, ``Tenant``): sent to KIE it would silently not be
    the option, so the line is refused. ``(None, None)`` for a request field or an option.
    ``what`` names the key in the warning (``key 'foo'`` or ``column 'foo'``)."""
    if name in FIELD_KINDS or name in LINE_KEYS or name in OWN_KEYS:
        return None, None
    option = near_miss(name, [*LINE_KEYS, *OWN_KEYS])
    if option is not None and near_miss(name, FIELD_KINDS) is None:
        return None, {"field": name, "message": f"is not a field of the KIE request; did you mean the option "
                      f"{option}? (options: {', '.join(LINE_KEYS)})"}
    close = near_miss(name, [*FIELD_KINDS, *LINE_KEYS])
    return (f"{what} {name!r} is not a field of the KIE request" + (f" (did you mean {close}?)" if close else "")
            + "; it is sent to KIE as it is"), None


def parse_jsonl(text: str) -> list[Line]:
    """One :class:`Line` per non-blank line; a line that is not a JSON object carries a problem."""
    out: list[Line] = []
    for n, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not raw.strip():
            continue
        entry = Line(n)
        out.append(entry)
        try:
            obj = loads_unique(raw)
        except json.JSONDecodeError as exc:
            entry.problems.append({"field": "line", "message": f"is not valid JSON ({exc.msg} at column {exc.colno})"})
            continue
        except DuplicateKeyError as exc:
            entry.problems.append({"field": "line", "message": f"is ambiguous: {exc}"})
            continue
        if not isinstance(obj, dict):
            entry.problems.append({"field": "line", "message": f"must be a JSON object (a request), got "
                                   f"{type(obj).__name__}"})
            continue
        _split(entry, obj)
    return out


def _split(entry: Line, obj: dict[str, Any]) -> None:
    """Fill ``entry`` from a JSONL object, flat (request fields beside LINE_KEYS) or ``{"request": …}``."""
    if "request" in obj:
        if isinstance(obj["request"], dict):
            entry.request = dict(obj["request"])
        else:
            entry.problems.append({"field": "request", "message": "must be a JSON object"})
        for key, value in obj.items():
            if key in LINE_KEYS:
                entry.options[key] = value
            elif key != "request" and key not in OWN_KEYS:
                entry.problems.append({"field": key, "message": "unknown key beside request (allowed: "
                                       + ", ".join(LINE_KEYS) + ")"})
    else:
        for key, value in obj.items():
            if key in LINE_KEYS:
                entry.options[key] = value
            elif key not in OWN_KEYS:
                warning, problem = unknown_key(key, "key")
                if problem is not None:
                    entry.problems.append(problem)
                    continue
                if warning is not None:
                    entry.warnings.append(warning)
                entry.request[key] = value
    for key in OWN_KEYS:
        if key in obj:
            entry.problems.append({"field": key, "message": _OWN_MESSAGE})
    entry.options = {k: v for k, v in entry.options.items() if v is not None}
    if "audio_file" in entry.options and not (isinstance(entry.options["audio_file"], str)
                                              and entry.options["audio_file"].strip()):
        entry.problems.append({"field": "audio_file", "message": "must be a file path (text)"})
        del entry.options["audio_file"]


_OWN_MESSAGE = "is set by batch submit (jobs are named {batch}-{line}); choose the batch with --batch-id"


def typed_cell(name: str, text: str) -> Any:
    """A CSV cell as the value of field ``name``; ValueError with a message fit for a field error."""
    if name == "metadata":
        try:
            return loads_unique(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object ({exc.msg} at column {exc.colno})") from None
        except DuplicateKeyError as exc:
            raise ValueError(f"is ambiguous: {exc}") from None
    if name == "steps":
        from kie_extend.jobs.plan import parse_steps_text

        return parse_steps_text(text)
    if name == "priority":
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        raise ValueError(f"must be an integer from 0 to 9 (higher goes first), got {text!r}")
    kind = FIELD_KINDS.get(name, str)
    if kind is bool:
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"must be true/false/1/0/yes/no, got {text!r}")
    if kind is float:
        try:
            number = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise ValueError(f"must be a number, got {text!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {text!r}")
        return number
    return text


def parse_csv(text: str) -> tuple[list[Line], list[str]]:
    """One :class:`Line` per non-blank record, numbered by the line it starts on, and warnings.

    Problems with the header itself are carried by a Line numbered as the header; BatchFileError
    when there is no header at all."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    header: list[str] | None = None
    for row in reader:
        if any(cell.strip() for cell in row):
            header = [cell.strip() for cell in row]
            break
    if header is None:
        raise BatchFileError("has no header row (the first line names the columns)")
    header_line = reader.line_num
    out: list[Line] = []
    warnings: list[str] = []
    head = Line(header_line, header=True)
    seen: set[str] = set()
    for i, name in enumerate(header, 1):
        if name in seen:
            head.problems.append({"field": name, "message": "column appears twice"})
        seen.add(name)
        if name in OWN_KEYS:
            head.problems.append({"field": name, "message": _OWN_MESSAGE})
        elif name:
            warning, problem = unknown_key(name, "column")
            if problem is not None:
                head.problems.append(problem)
            elif warning is not None:
                warnings.append(warning.replace("sent to KIE as it is", "sent as text"))
    if head.problems:
        out.append(head)
    previous = header_line
    for row in reader:
        start, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        entry = Line(start)
        out.append(entry)
        if len(row) > len(header):
            entry.problems.append({"field": "row", "message": f"has {len(row)} cells but the header names "
                                   f"{len(header)} columns"})
        for i, (name, cell) in enumerate(zip(header, row), 1):
            cell = cell.strip()
            if not cell or name in OWN_KEYS:
                continue
            if not name:
                entry.problems.append({"field": f"column {i}", "message": "has a value but no name in the header"})
                continue
            try:
                value = typed_cell(name, cell)
            except ValueError as exc:
                entry.problems.append({"field": name, "message": str(exc)})
                continue
            (entry.options if name in LINE_KEYS else entry.request)[name] = value
    return out, warnings


def parse_batch(data: bytes, name: str, fmt: Format | None = None) -> tuple[list[Line], list[str], Format]:
    """The file's job lines, warnings, and the format used (``fmt`` or detected from name and text)."""
    text = decode(data)
    fmt = fmt or detect_format(name, text)
    if fmt == "jsonl":
        lines = parse_jsonl(text)
        return lines, [f"line {ln.line}: {w}" for ln in lines for w in ln.warnings], fmt
    lines, warnings = parse_csv(text)
    return lines, warnings, fmt


# -- naming -------------------------------------------------------------------------------------

def default_batch_id(path: str | os.PathLike[str], data: bytes) -> str:
    """``{stem}-{8 hex of the content's SHA-256}``: the same file always gets the same batch id."""
    # The stem in the id grammar (jobs/ids.py): other characters become '-', and it starts and ends
    # with a letter or digit.
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).stem, flags=re.ASCII).strip("-._")[:64].strip("-._") or "batch"
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}"


def job_id_for(batch_id: str, line: int) -> str:
    """The job id of line ``line``: ``{batch_id}-{line}``, or ``b{hash}-{line}`` when that is not a valid id."""
    candidate = f"{batch_id}-{line}"
    if JOB_ID_PATTERN.fullmatch(candidate):
        return candidate
    return f"b{hashlib.sha256(batch_id.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}-{line}"


def line_of(batch_id: str, job_id: str) -> int | None:
    """The line a job of this batch came from; None for a job ``batch submit`` did not name."""
    tail = job_id.rpartition("-")[2]
    if tail.isdigit() and job_id_for(batch_id, int(tail)) == job_id:
        return int(tail)
    return None


def idempotency_key_for(batch_id: str, line: int) -> str:
    """The default idempotency key of a line: ``{batch_id}:{line}``."""
    return f"{batch_id}:{line}"


def build_items(lines: list[Line], batch_id: str, base_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``enqueue_many`` items (plus their ``line``), one per job line, in file order.

    Each carries its deterministic ``job_id``, its idempotency key, its own options and, for a
    local file, ``audio_file`` resolved against ``base_dir``. Lines with reading problems are
    included (so the rest of them is checked too); only a clean file is ever submitted."""
    items: list[dict[str, Any]] = []
    for ln in lines:
        if ln.header:
            continue
        item: dict[str, Any] = {"request": ln.request, "job_id": job_id_for(batch_id, ln.line), "line": ln.line,
                                **ln.options}
        item.setdefault("idempotency_key", idempotency_key_for(batch_id, ln.line))
        if "audio_file" in item:
            item["audio_file"] = str(Path(base_dir, os.path.expanduser(item["audio_file"])))
        items.append(item)
    return items


# -- checking -----------------------------------------------------------------------------------

def check_item(item: dict[str, Any], settings: Any, defaults: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Every problem of one item, as ``enqueue_many`` would find them (a local file is probed).
    ``defaults``: the command line's ``tenant``/``priority``/``not_after``, used where the item
    gives none (as ``enqueue_many`` applies them)."""
    from kie_extend.api import check_audio_file, check_extend

    defaults = defaults or {}
    options = {k: item[k] if item.get(k) is not None else defaults.get(k) for k in OPTION_KEYS}
    key, metadata = item.get("idempotency_key"), item.get("metadata")
    try:
        if item.get("audio_file") is None:
            check_extend(item["request"], idempotency_key=key, metadata=metadata, settings=settings, **options)
            return []
        problems: list[dict[str, str]] = []
        try:
            check_audio_file(item["request"], item["audio_file"], idempotency_key=key, metadata=metadata,
                             settings=settings)
        except ValidationError as exc:
            problems += exc.errors
        out = Intake()
        check_options(out, **options, refuse_past=True)
        return problems + out.problems
    except ValidationError as exc:
        return list(exc.errors)


def check_lines(lines: list[Line], items: list[dict[str, Any]], settings: Any,
                defaults: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem in the file, in line order: reading problems, then each line's checks (fields
    already reported while reading are not reported again; a line that is not an object is not checked).
    ``defaults``: the command line's ``tenant``/``priority``/``not_after`` for lines without them."""
    problems = [Problem(ln.line, p["field"], p["message"]) for ln in lines for p in ln.problems]
    read = {ln.line: {p["field"] for p in ln.problems} for ln in lines if not ln.header}
    for item in items:
        seen = read.get(item["line"], set())
        if seen & {"line", "request"}:
            continue
        problems += [Problem(item["line"], p["field"], p["message"]) for p in check_item(item, settings, defaults)
                     if p["field"] not in seen]
    if any(item.get("audio_file") for item in items) and not settings.api_key_value():
        problems.append(Problem(None, "audio_file", "KIE_API_KEY is not set; uploading a local audio file needs it"))
    return sorted(problems, key=lambda p: (p.line is not None, p.line or 0))


def check_defaults(settings: Any, batch_id: str, tenant: str | None, priority: int | None,
                   not_after: str | None) -> list[Problem]:
    """Problems with the command line's batch id and defaults (reported as ``file: --flag: …``)."""
    out = Intake(tenant=settings.default_tenant)
    check_options(out, tenant=tenant, priority=priority, batch_id=batch_id, not_after=not_after, refuse_past=True)
    flag = {"batch_id": "--batch-id", "tenant": "--tenant", "priority": "--priority", "not_after": "--not-after"}
    return [Problem(None, flag.get(p["field"], p["field"]), p["message"]) for p in out.problems]


# -- submitting ---------------------------------------------------------------------------------

def existing_ids(rt: Any, job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` that already have a job record (a worker accepted them)."""
    pipe = rt.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.exists(rt.keys.job(job_id))
    return {j for j, there in zip(job_ids, pipe.execute()) if there}


def submit(items: list[dict[str, Any]], *, settings: Any, rt: Any, batch_id: str, tenant: str | None = None,
           priority: int | None = None, not_after: str | None = None, chunk: int = CHUNK,
           progress: Any = None, steps: list[dict[str, Any]] | None = None,
           takes: str | None = None) -> tuple[int, int]:
    """Enqueue checked items in chunks; returns ``(sent, already_there)``.

    A line is "already there" when a worker recorded its job, or when an earlier run published its
    message (each job id is claimed, and marked sent with its message: see ``enqueue_many``), so
    a re-run sends nothing twice even before any worker picked the batch up. ``progress(done,
    total)`` is called after each chunk. Raises what ``enqueue_many`` raises
    (``ProviderError``/``ConfigError`` from an upload); what was sent before stays sent, and a
    re-run resumes."""
    from kie_extend.api import enqueue_many_sent

    sent = existed = 0
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        there = existing_ids(rt, [it["job_id"] for it in part])
        published: set[int] = set()
        if len(there) < len(part):
            _, published = enqueue_many_sent([{k: v for k, v in it.items() if k != "line"} for it in part],
                                             settings=settings, batch_id=batch_id, tenant=tenant,
                                             priority=priority, not_after=not_after, skip_existing=True,
                                             steps=steps, takes=takes)
        sent += len(published)
        existed += len(part) - len(published)
        if progress is not None:
            progress(start + len(part), len(items))
    return sent, existed


# -- status -------------------------------------------------------------------------------------

def finished_count(batch: dict[str, Any]) -> int:
    """Jobs of the batch in a terminal state (duplicates included)."""
    return sum(n for state, n in batch.get("counts", {}).items() if state in _DONE)


def counts_text(counts: dict[str, int]) -> str:
    """``queued=3  succeeded=5`` in the order a job moves through its states."""
    ordered = [s for s in _STATE_ORDER if counts.get(s)] + sorted(s for s in counts if s not in _STATE_ORDER)
    return "  ".join(f"{s}={counts[s]}" for s in ordered) or "no jobs"


def status_line(batch: dict[str, Any]) -> str:
    """One line: ``B  5/8 finished  queued=3  succeeded=5`` (or ``B  not found``)."""
    if batch.get("state") == "not_found":
        return f"{batch['batch_id']}  not found"
    done = "finished" if batch.get("finished") else "running"
    return (f"{batch['batch_id']}  {finished_count(batch)}/{batch['total']} done ({done})  "
            f"{counts_text(batch['counts'])}" + ("  [cancelled]" if batch.get("cancelled") else ""))


def exit_code(batch: dict[str, Any]) -> int:
    """3 not found, 1 when a job failed or was cancelled, else 0."""
    if batch.get("state") == "not_found":
        return EXIT_NOT_FOUND
    counts = batch.get("counts", {})
    return EXIT_FAILED if counts.get("failed") or counts.get("cancelled") else EXIT_OK


def wait_batch(get: Any, batch_id: str, *, stream: TextIO | None = None, tty: bool | None = None,
               interval: float = PLAIN_INTERVAL, timeout: float | None = None, poll: float = 0.5) -> int:
    """Follow a batch until it is finished; returns :func:`exit_code` (4 when ``timeout`` s passed).

    ``get(batch_id)`` is ``api.get_batch``. On a terminal a tqdm bar of finished/total with the
    counts as postfix; otherwise a plain :func:`status_line` at most every ``interval`` seconds
    when something changed, and always the last one."""
    stream = stream or sys.stdout
    tty = stream.isatty() if tty is None else tty
    start = time.monotonic()
    batch = get(batch_id)
    if batch.get("state") == "not_found":
        print(status_line(batch), file=stream, flush=True)
        return EXIT_NOT_FOUND
    bar = None
    if tty:
        from tqdm import tqdm

        # A terminal that reports no size (some ptys) would get no bar at all; fall back to 100x20.
        size = shutil.get_terminal_size((100, 20))
        bar = tqdm(total=batch["total"], unit="job", desc=batch_id[:32], file=stream, ncols=size.columns,
                   nrows=size.lines)
    last_text, last_print = "", -math.inf
    try:
        while True:
            if bar is not None:
                bar.total = batch["total"]
                bar.n = finished_count(batch)
                bar.set_postfix_str(counts_text(batch["counts"]), refresh=False)
                bar.refresh()
            else:
                text = status_line(batch)
                now = time.monotonic()
                if text != last_text and (now - last_print >= interval or batch["finished"]):
                    print(f"[{now - start:6.1f}s] {text}", file=stream, flush=True)
                    last_text, last_print = text, now
            if batch["finished"]:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                if bar is not None:
                    bar.close()
                    bar = None
                print(f"still running after {timeout:g} s: {status_line(batch)}", file=stream, flush=True)
                return EXIT_TIMEOUT
            time.sleep(poll)
            batch = get(batch_id)
    finally:
        if bar is not None:
            bar.close()
    if tty:
        print(status_line(batch), file=stream, flush=True)
    return exit_code(batch)


# -- results ------------------------------------------------------------------------------------

def result_row(rec: dict[str, Any], line: int | None, files: list[str]) -> dict[str, Any]:
    """One results row (:data:`RESULT_COLUMNS`) from a job's status record."""
    error = rec.get("error") or {}
    tracks = rec.get("tracks") or []
    return {
        "job_id": rec["job_id"],
        "line": line,
        "state": rec["state"],
        "error_kind": error.get("kind"),
        "error_message": error.get("message"),
        "tracks": len(tracks),
        "audio_urls": [t["audio_url"] for t in tracks if t.get("audio_url")],
        "files": files,
        "kie_task_id": rec.get("kie_task_id"),
        "steps": [{"op": st.get("op"), "take": st.get("take"), "state": st.get("state"),
                   "kie_task_id": st.get("kie_task_id"), "error": st.get("error"),
                   **{k: v for k, v in (st.get("result") or {}).items() if k.endswith("_url")}}
                  for st in rec.get("steps") or []],
    }


def downloaded_files(download_dir: str, rec: dict[str, Any]) -> list[str]:
    """Paths of the files the ``download`` handler wrote for this job (its manifest), when visible here."""
    if "download" not in (rec.get("handlers") or {}):
        return []
    from kie_extend.handlers.download import MANIFEST, _safe_name

    job_dir = Path(download_dir) / _safe_name(rec["job_id"])
    try:
        manifest = json.loads((job_dir / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return []
    tracks = manifest.get("tracks") if isinstance(manifest, dict) else None
    return [str(job_dir / t["file"]) for t in tracks or [] if isinstance(t, dict) and isinstance(t.get("file"), str)]


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in file-line order; jobs not named by ``batch submit`` last, by id."""
    return sorted(rows, key=lambda r: (r["line"] is None, r["line"] or 0, r["job_id"]))


def write_rows(rows: list[dict[str, Any]], fmt: Format, stream: TextIO) -> None:
    """JSONL (lists stay lists) or CSV with a header (lists space-separated, None empty, ``steps`` as JSON)."""
    if fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    writer = csv.DictWriter(stream, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if k == "steps" and v else
                         " ".join(v) if isinstance(v, list) else "" if v is None else v for k, v in row.items()})


def write_atomic(path: str | os.PathLike[str], rows: list[dict[str, Any]], fmt: Format) -> None:
    """Write ``rows`` to ``path`` through a temp file in the same directory, then rename it into place."""
    with atomic_file(path, text=True) as fh:
        write_rows(rows, fmt, fh)


# -- commands -----------------------------------------------------------------------------------

def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    """Check every line of FILE, then enqueue it as one batch; a re-run sends nothing twice."""
    from kie_extend.cli.common import runtime as _runtime, settings as _settings
    from kie_extend.errors import ProviderError

    settings = _settings()
    path = Path(args.file)
    try:
        data = path.read_bytes()
        lines, warnings, fmt = parse_batch(data, path.name, args.format)
    except OSError as exc:
        _err(f"error: cannot read {path}: {exc.strerror or exc}")
        return EXIT_INVALID
    except BatchFileError as exc:
        _err(f"error: {path} {exc}")
        return EXIT_INVALID
    batch_id = args.batch_id or default_batch_id(path, data)
    for warning in warnings:
        _err(f"warning: {warning}")
    items = build_items(lines, batch_id, path.parent)
    problems = check_defaults(settings, batch_id, args.tenant, args.priority, args.not_after)
    steps = None
    if args.steps is not None:
        from kie_extend.jobs.plan import check_plan, parse_steps_text

        try:
            steps = parse_steps_text(args.steps)
        except ValueError as exc:
            problems.append(Problem(None, "--steps", str(exc)))
        else:
            flagged = [Problem(None, "--" + p["field"], p["message"]) for p in check_plan(steps, args.takes)[2]]
            problems += flagged
            if flagged:
                steps = None  # reported once, for the flag, not again for every line
    problems += check_lines(lines, items, settings,
                            {"tenant": args.tenant, "priority": args.priority, "not_after": args.not_after,
                             "steps": steps, "takes": args.takes})
    if not lines:
        problems.append(Problem(None, "lines", "the file holds no jobs"))
    if problems:
        _err(f"error: {len(problems)} problem(s) in {path}; nothing was enqueued:")
        for p in problems:
            _err(f"  {p}")
        return EXIT_INVALID
    if args.quote:
        return _quote(settings, items, args)
    print(f"batch {batch_id}: {len(items)} job(s) from {path} ({fmt})", flush=True)
    if args.dry_run:
        print("dry run: every line is valid; nothing was enqueued")
        return EXIT_OK
    rt = _runtime(settings)

    def progress(done: int, total: int) -> None:
        if total > CHUNK:
            _err(f"  enqueued {done}/{total} lines")

    try:
        sent, existed = submit(items, settings=settings, rt=rt, batch_id=batch_id, tenant=args.tenant,
                               priority=args.priority, not_after=args.not_after, progress=progress,
                               steps=steps, takes=args.takes)
    except KeyboardInterrupt:
        _err(f"interrupted: run the same command again to resume batch {batch_id}; nothing is sent twice")
        return EXIT_INTERRUPTED
    except ValidationError as exc:
        _err(f"error: {exc}")
        return EXIT_INVALID
    except (ProviderError, ConfigError) as exc:
        _err(f"error: upload failed: {exc}; run the same command again to resume (nothing is sent twice)")
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_PROVIDER
    from kie_extend.jobs.batches import get_batch

    total = get_batch(rt, batch_id).get("total", sent + existed)
    print(f"batch {batch_id}: sent {sent}, already there {existed}, batch total {total}", flush=True)
    if not args.wait:
        print(f"follow it with: kie-extend batch status {batch_id} --wait", flush=True)
        return EXIT_OK
    return wait_batch(lambda b: get_batch(rt, b), batch_id)


def quote_text(q: dict[str, Any]) -> str:
    """A quote (credits/quotes.py ``quote``) as a small human table."""
    from kie_extend.credits.prices import format_credits

    def num(v: Any) -> str:
        return "-" if v is None else format_credits(v)

    balance = num(q["balance"]) + (f" ({q['balance_source']})" if q["balance_source"] else
                                   f" (unknown: {q['balance_reason']})")
    eta = "-" if q["eta_seconds"] is None else f"{q['eta_seconds']} s (incl. {q['generation_seconds']:g} s generation)"
    rows = [("jobs", str(q["jobs"])), ("credits", num(q["credits"])), ("eta", eta), ("balance", balance),
            ("budget left", num(q["budget_left"])), ("fits", "yes" if q["fits"] else "NO")]
    if len(q["tenants"]) > 1:
        for name, t in q["tenants"].items():
            rows.append((f"  {name}", f"{t['jobs']} job(s), {num(t['credits'])} credits, eta {t['eta_seconds']} s, "
                                      f"budget left {num(t['budget_left'])}, fits {'yes' if t['fits'] else 'NO'}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _quote(settings: Any, items: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """``batch submit --quote``: the quote for the lines a run would send (those not already there)."""
    from kie_extend.cli.common import runtime as _runtime
    from kie_extend.credits.quotes import quote
    from kie_extend.jobs.intake import DEFAULT_PRIORITY

    rt = _runtime(settings)
    there = existing_ids(rt, [it["job_id"] for it in items])
    from kie_extend.credits.prices import steps_price
    from kie_extend.jobs.plan import parse_steps_text

    default_steps = parse_steps_text(args.steps) if args.steps is not None else None
    jobs = [(it.get("tenant") or args.tenant or settings.default_tenant,
             int(it["priority"] if it.get("priority") is not None else
                 args.priority if args.priority is not None else DEFAULT_PRIORITY),
             steps_price(settings.prices, it["steps"] if it.get("steps") is not None else default_steps,
                         it.get("takes") or args.takes))
            for it in items if it["job_id"] not in there]
    q = quote(rt, jobs)
    if args.json:
        print(json.dumps({**q, "already_there": len(there)}), flush=True)
    else:
        if there:
            print(f"{len(there)} line(s) already there are not quoted (a re-run does not send them)")
        print(quote_text(q), flush=True)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """A batch's counts by state; with --wait, live progress until it is finished."""
    from kie_extend.jobs.batches import get_batch
    from kie_extend.cli.common import runtime as _runtime, settings as _settings

    rt = _runtime(_settings())
    if not args.json and get_batch(rt, args.batch_id).get("state") == "not_found":
        _err(f"error: no batch {args.batch_id}")
        return EXIT_NOT_FOUND
    if args.wait:
        # With --json the progress goes to stderr and stdout gets the final record alone.
        code = wait_batch(lambda b: get_batch(rt, b), args.batch_id, interval=args.interval, timeout=args.timeout,
                          stream=sys.stderr if args.json else None)
        if not args.json:
            return code
    batch = get_batch(rt, args.batch_id)
    if args.json:
        print(json.dumps({**batch, "done": finished_count(batch)} if "total" in batch else batch, indent=2))
    else:
        print(status_line(batch))
    return code if args.wait else exit_code(batch)


def collect_rows(settings: Any, rt: Any, batch_id: str) -> list[dict[str, Any]]:
    """One row per job of the batch, in file-line order; a job no worker has recorded yet is ``pending``
    (as in ``batch status`` and ``GET /v1/jobs?batch_id=``)."""
    from kie_extend.api import get_job
    from kie_extend.jobs.batches import batch_job_ids
    from kie_extend.jobs.listing import PENDING

    rows = []
    for ids in batch_job_ids(rt, batch_id):
        for job_id in ids:
            rec = get_job(job_id, settings=settings)
            if rec["state"] == "not_found":  # declared by batch submit, not yet recorded by a worker
                rec = {**rec, "state": PENDING}
            rows.append(result_row(rec, line_of(batch_id, job_id), downloaded_files(settings.download_dir, rec)))
    return sort_rows(rows)


def cmd_results(args: argparse.Namespace) -> int:
    """Write one row per job (state, tracks, files, error) as JSONL or CSV, to a file or stdout."""
    from kie_extend.jobs.batches import get_batch
    from kie_extend.cli.common import runtime as _runtime, settings as _settings

    settings = _settings()
    rt = _runtime(settings)
    batch = get_batch(rt, args.batch_id)
    if batch.get("state") == "not_found":
        _err(f"error: no batch {args.batch_id}")
        return EXIT_NOT_FOUND
    rows = collect_rows(settings, rt, args.batch_id)
    if args.json:
        if args.format or args.output:
            _err("error: --json prints one JSON document to stdout; it cannot be combined with --format or --output")
            return EXIT_INVALID
        print(json.dumps({"batch_id": args.batch_id, "results": rows}, indent=2, ensure_ascii=False))
        return EXIT_OK
    args.format = args.format or "jsonl"
    if args.output:
        write_atomic(args.output, rows, args.format)
        _err(f"wrote {len(rows)} row(s) to {args.output} ({status_line(batch)})")
    else:
        write_rows(rows, args.format, sys.stdout)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """The newest batches with their totals, counts and whether they are finished."""
    from kie_extend.jobs.batches import list_batches
    from kie_extend.cli.common import runtime as _runtime, settings as _settings

    batches = list_batches(_runtime(_settings()), args.limit)
    if args.json:
        print(json.dumps({"batches": [{**batch, "done": finished_count(batch)} for batch in batches]}, indent=2))
        return EXIT_OK
    for batch in batches:
        print(f"{status_line(batch)}  created {batch.get('created_at') or '?'}")
    if not batches:
        print("no batches")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register ``kie-extend batch submit|status|results|list`` on the main parser's subparsers."""
    b = sub.add_parser("batch", help="submit a JSONL or CSV file of requests as one batch, follow it, "
                       "collect its results")
    bs = b.add_subparsers(dest="batch_command", required=True)

    s = bs.add_parser("submit", help="check every line, then enqueue the file as one batch (re-runs resume)")
    s.add_argument("file", help="JSONL (a request object per line) or CSV (a column per request field)")
    s.add_argument("--batch-id", help="default: the file's name plus a hash of its content")
    s.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file's name, else its content")
    s.add_argument("--tenant", help="default tenant of lines that do not name one")
    s.add_argument("--priority", type=int, help="default priority 0-9 of lines that do not give one")
    s.add_argument("--not-after", help="default deadline (ISO-8601 UTC or epoch seconds)")
    s.add_argument("--steps", help="default follow-up steps of lines that give none: "
                   "wav,stems=separate_vocal,midi,video,lyrics or a JSON array")
    s.add_argument("--takes", choices=["all", "first"], help="default takes the steps run on (all)")
    s.add_argument("--dry-run", action="store_true", help="check every line, enqueue nothing")
    s.add_argument("--quote", action="store_true", help="check every line, enqueue nothing, and print what the "
                   "batch would cost (credits), when it would be done, the balance and the budget left")
    s.add_argument("--json", action="store_true", help="with --quote: the quote as one JSON object")
    s.add_argument("--wait", action="store_true", help="then follow the batch like `batch status --wait`")
    s.set_defaults(func=cmd_submit)

    st = bs.add_parser("status", help="a batch's counts by state (exit 0 ok, 1 failures, 3 not found)")
    st.add_argument("batch_id")
    st.add_argument("--wait", action="store_true", help="live progress until the batch is finished")
    st.add_argument("--json", action="store_true")
    from kie_extend.cli.common import seconds_arg

    st.add_argument("--interval", type=seconds_arg, default=PLAIN_INTERVAL,
                    help="seconds between progress lines when stdout is not a terminal (default 5)")
    st.add_argument("--timeout", type=seconds_arg, help="with --wait: give up after this many seconds (exit 4)")
    st.set_defaults(func=cmd_status)

    r = bs.add_parser("results", help="one row per job, in file order: state, tracks, audio URLs, files, error")
    r.add_argument("batch_id")
    r.add_argument("--format", choices=["jsonl", "csv"], help="a results file: one JSON row per line (default) "
                   "or CSV with a header")
    r.add_argument("--output", "-o", help="file to write (atomically); default stdout")
    r.add_argument("--json", action="store_true", help='one JSON document instead: {"batch_id": ..., "results": [...]}')
    r.set_defaults(func=cmd_results)

    from kie_extend.cli.common import add_listing_args

    ls = bs.add_parser("list", help="the newest batches, newest first")
    add_listing_args(ls, "batches")
    ls.set_defaults(func=cmd_list)


__all__ = ["LINE_KEYS", "unknown_key", "Line", "Problem", "BatchFileError", "parse_batch", "parse_csv", "parse_jsonl",
           "typed_cell", "default_batch_id", "job_id_for", "line_of", "build_items", "check_lines", "submit",
           "wait_batch", "result_row", "write_rows", "write_atomic", "add_parser"]
