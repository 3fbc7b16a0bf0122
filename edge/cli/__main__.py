"""`python -m edge.cli`: the same as the `vla-edge` command."""

from edge.cli import main

raise SystemExit(main())
