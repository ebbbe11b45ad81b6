"""`python -m training.tracking sync <output> [<output> ...]`: send to MLflow what runs logged from these
folders while the tracking server was away (their `mlflow_journal/`), in order, into the same runs."""

from __future__ import annotations

import sys

from training.tracking.journal import sync

USAGE = "usage: python -m training.tracking sync <output folder> [...]"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "sync":
        print(USAGE, file=sys.stderr)
        return 2
    total_journals = total_calls = 0
    for output in argv[1:]:
        try:
            journals, calls = sync(output)
        except (ConnectionError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{output}: sent {calls} call(s) of {journals} run journal(s)")
        total_journals, total_calls = total_journals + journals, total_calls + calls
    if len(argv) > 2:
        print(f"sent {total_calls} call(s) of {total_journals} run journal(s) in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
