"""``python -m spicesync`` runs the CLI."""

from spicesync.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
