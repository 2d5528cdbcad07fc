"""Export failures and warnings: the CLI prints each as one line on stderr (failures exit non-zero)."""
import sys


class ExportError(Exception):
    """A stage failed or produced an artifact that did not pass its check; nothing is handed over."""


def warn(message: str) -> None:
    """An option that changed nothing is reported on stderr, so that a script reading the stage log
    on stdout does not take the warning for progress."""
    print(f"reid-export: {message}", file=sys.stderr)
