"""`python -m edge.cli`: the same as the `vla-edge` command."""

from edge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
