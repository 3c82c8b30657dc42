"""The ``kie-extend`` command line: the main commands, ``batch``, ``demo``, ``dev`` and the local
stack they start, and how failures are reported (one line, a documented exit code).

:func:`main` is the ``kie-extend`` entry point (``kie_extend.cli:main``); the commands themselves
are in :mod:`kie_extend.cli.commands`, imported when the command runs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run ``kie-extend`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code (see
    :mod:`kie_extend.cli.errors`)."""
    from kie_extend.cli.commands import main as run

    return run(argv)
