"""`python -m kie_extend.simulator`."""

from kie_extend.simulator.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m kie_extend.simulator"))
