"""The exceptions every entry point understands.

`UserError` means "the user's input is wrong": every entry point (`python -m lldist.surface`,
`.train`, `.plot`, ...) catches it, prints its message on one line and exits with status 2.
`Stopped` means a signal (SIGTERM: a Slurm time limit, a preemption) asked the run to stop;
what is finished is kept, and the exit status is 128 + the signal number.
Anything else is a bug or a fault of the machine and keeps its traceback.
"""

import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: a job file, a checkpoint, a dataset root, an output path."""


class Stopped(Exception):
    """A signal asked the run to stop; `signum` is its number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn a UserError into one line on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"lldist: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Stopped as e:
        print(f"lldist: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lldist: interrupted", file=sys.stderr)
        return 130
