"""`python -m kie_extend.simulator`."""

from kie_extend.simulator.cli import main

raise SystemExit(main())
