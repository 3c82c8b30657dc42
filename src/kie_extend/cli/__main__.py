"""``python -m kie_extend.cli``: the same as the ``kie-extend`` command."""
from kie_extend.cli.main import main

raise SystemExit(main())
