"""The one exception type that means "the user's input is wrong".

Every entry point (`python -m lldist.surface`, `.train`, `.plot`, `.bench`)
catches `UserError`, prints its message on one line and exits with status 2.
Anything else is a bug or a fault of the machine and keeps its traceback.
"""

import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: a job file, a checkpoint, a dataset root, an output path."""


def fail(message: str) -> "NoReturn":  # noqa: F821 - typing only
    raise UserError(message)


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn a UserError into one line on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except UserError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"lldist: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lldist: interrupted", file=sys.stderr)
        return 130
