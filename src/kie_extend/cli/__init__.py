"""The ``kie-extend`` command line: the main commands, ``batch``, ``demo``, ``dev`` and the local
stack they start, and how failures are reported (one line, a documented exit code)."""
