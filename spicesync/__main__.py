"""``python -m spicesync`` runs the CLI."""

from spicesync.cli.main import entry

if __name__ == "__main__":
    entry()
