"""``python -m kie_extend.cli``: the same as the ``kie-extend`` command."""

if __name__ == "__main__":
    from kie_extend.cli import main

    raise SystemExit(main())
