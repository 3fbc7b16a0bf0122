"""The design card's entry point, kept for `python build_engines.py --int8`; the build lives in the build_engines package (build_engines/cli.py)."""

from build_engines.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
