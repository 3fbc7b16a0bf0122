#!/usr/bin/env python3
"""Offline build entry point: `python build_engines.py --int8` (same as the `build-engines` command)."""

from build_engines.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
