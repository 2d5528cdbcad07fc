"""Export failures: the CLI prints the message as one line and exits non-zero."""


class ExportError(Exception):
    """A stage failed or produced an artifact that did not pass its check; nothing is handed over."""
