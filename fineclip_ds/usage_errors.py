"""Usage errors of the command-line entry points: a message and exit status 2, as argparse gives its own, where
SystemExit('message') exits 1, the status of a crash, which scripts around a run cannot tell from one."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UsageError(SystemExit):
    """A missing or wrong input of a command. Its main prints it (`report_usage_errors`); str() is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2

    def __str__(self) -> str:
        return str(self.args[0])


@contextlib.contextmanager
def report_usage_errors(program: str) -> Iterator[None]:
    """Around a command's main: a UsageError's message on stderr, then exit 2."""
    try:
        yield
    except UsageError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise


def first_lines(error: BaseException, limit: int = 600) -> str:
    """The first two lines of a loading error, cut at `limit` characters: torch's state-dict errors list every
    missing key on their second line (~20 KB for a ViT-B file loaded as another model)."""
    text = " ".join(line.strip() for line in str(error).splitlines()[:2])
    return text if len(text) <= limit else text[:limit] + " ..."
