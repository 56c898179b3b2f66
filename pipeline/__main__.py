"""`python -m pipeline ...` is the same as the `tubelet` console script (for `ray job submit`)."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
