"""How the ``kie-extend`` command reports a failure: one line on stderr and a documented exit code.

Every subcommand runs through :func:`run`, which turns the ordinary mistakes and outages into one
line (what went wrong, which setting or file, how to fix it; passwords and the API key masked)
and an exit code from this table (also in the README, "The kie-extend command"):

====  =====================================================================================
code  meaning
====  =====================================================================================
0     done
1     the command ran and the answer is "no": a job failed, ``doctor`` found violations, a
      job could not be retried or cancelled (the reason is printed)
2     usage or bad input: a flag or a word too many (argparse exits 2 too), an invalid request,
      a missing, unreadable or malformed request/batch file, ``--metadata`` that is not JSON
3     no such job or batch: ``status`` (with or without ``--wait``), ``retry``, ``cancel``,
      ``batch status``/``batch results``/``cancel --batch``
4     ``batch status --timeout``: still running when the time ran out
5     a bad setting (a ``KIE_*`` variable, named in the message) or a start-up check that
      refuses it (an evicting Redis)
6     the job store or the broker cannot be reached or refuses us (wrong password, not ready)
7     the provider (KIE, or its file host) cannot be reached or refused the call
70    an unexpected error: a bug; ``--debug`` shows its traceback
130   interrupted (Ctrl-C)
141   stdout was closed early (``kie-extend jobs | head``); nothing is printed
====  =====================================================================================

No traceback is printed unless ``--debug`` is given or ``KIE_LOG_LEVEL=DEBUG``; then the
traceback comes first and the one line last.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from kie_extend.infra.check import chain, endpoint_of, unreachable_reason
from kie_extend.infra.endpoints import mask_text
from kie_extend.errors import (AccountError, ConfigError, config_error_line, ConnectError, KieExtendError, OutcomeUnknownError, ProviderError,
                     ValidationError)

#: redis-py's wording for an error inside a pipeline; it quotes the command and its arguments (job
#: data), so an error line keeps only the server's reply.
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_TIMEOUT = 4
EXIT_CONFIG = 5
EXIT_UNREACHABLE = 6
EXIT_PROVIDER = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class InputError(KieExtendError):
    """A file or flag given on the command line cannot be used; the message names it (exit 2)."""


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` was given, or ``KIE_LOG_LEVEL`` is ``DEBUG``: show tracebacks."""
    return flag or os.environ.get("KIE_LOG_LEVEL", "").strip().upper() == "DEBUG"


def run(func: Callable[[], int], *, debug: bool = False) -> int:
    """Call ``func`` and return its exit code; any exception becomes one line on stderr and its code."""
    try:
        code = int(func() or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SystemExit:
        raise
    except BrokenPipeError:
        # stdout went away (``kie-extend jobs | head``): not an error worth a line.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as exc:  # noqa: BLE001 - everything becomes one line and a code
        code, line = describe(exc)
        if debug_requested(debug):
            traceback.print_exc()
        elif code == EXIT_INTERNAL:
            line += " (a bug: run again with --debug for the traceback and report it)"
        print(f"error: {line}", file=sys.stderr, flush=True)
        return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one line without the "error: " prefix)`` for ``exc``; secrets masked."""
    settings = _settings_or_none()
    code, text = _describe(exc, settings)
    return code, mask_text(" ".join(text.split()), settings)


def _describe(exc: BaseException, settings: Any) -> tuple[int, str]:
    from kie_extend.infra.errors import is_infra_error

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, config_error_line(exc)
    if isinstance(exc, ValidationError):
        return EXIT_USAGE, "invalid input: " + "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
    if isinstance(exc, InputError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ProviderError):
        return EXIT_PROVIDER, _provider_line(exc, settings)
    if any(is_infra_error(e) for e in chain(exc)):
        return EXIT_UNREACHABLE, _infra_line(exc, settings)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return EXIT_USAGE, "cannot listen: the address is already in use; stop the process using it or choose --port"
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_USAGE, f"cannot open {exc.filename}: {exc.strerror or exc}"
    return EXIT_INTERNAL, f"unexpected {type(exc).__name__}: {_PIPELINE_PREFIX.sub('', str(exc))}"


def _settings_or_none() -> Any:
    try:
        from kie_extend.config import load_settings

        return load_settings()
    except Exception:  # noqa: BLE001 - a setting problem has its own line already
        return None


def _infra_line(exc: BaseException, settings: Any) -> str:
    what, var, url = endpoint_of(exc, settings)
    happened, fix = unreachable_reason(exc)
    return f"cannot use {what} ({var}={url}): {happened}; {fix.format(var=var)}"


def _provider_line(exc: ProviderError, settings: Any) -> str:
    base = getattr(settings, "base_url", None) or "KIE_BASE_URL"
    if isinstance(exc, ConnectError):
        return f"cannot reach KIE ({exc}); check KIE_BASE_URL (now {base}) and the network"
    if isinstance(exc, OutcomeUnknownError):
        return f"KIE did not answer ({exc}); try again"
    if isinstance(exc, AccountError):
        hint = {401: "check KIE_API_KEY", 402: "top up the account's credits"}.get(exc.code, "check the account")
        return f"KIE refused the call: {exc}; {hint}"
    return f"KIE refused the call: {exc}"



__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_TIMEOUT", "EXIT_CONFIG",
           "EXIT_UNREACHABLE", "EXIT_PROVIDER", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "InputError",
           "run", "describe", "debug_requested", "mask_text", "unreachable_reason"]
