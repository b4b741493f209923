"""The exceptions every entry point understands.

`UserError` means "the user's input is wrong": every entry point (`python -m lldist.surface`,
`.train`, `.plot`, ...) catches it, prints its message on one line and exits with status 2.
`Stopped` means a signal (SIGTERM: a Slurm time limit, a preemption) asked the run to stop;
what is finished is kept, and the exit status is 128 + the signal number.
Anything else is a bug (lldist's or the user's code's) or a fault of the machine: the command
line prints its traceback, then one line naming where it happened, and exits with status 1.
"""

import argparse
import sys
import traceback

EXIT_USAGE = 2


class UserError(ValueError):
    """Bad input: a job file, a checkpoint, a dataset root, an output path. A ValueError, so
    that Python callers (lldist.open, lldist.landscape) can catch it as one."""


class Stopped(Exception):
    """A signal asked the run to stop; `signum` is its number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Quiet(Exception):
    """End this process with `exit_code` and say nothing: under MPI, another rank (rank 0) has
    said why, once."""

    def __init__(self, exit_code: int):
        super().__init__(f"exit {exit_code}")
        self.exit_code = int(exit_code)


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
    except Quiet as e:
        return e.exit_code
    except KeyboardInterrupt:
        print("lldist: interrupted; what is finished is kept: run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`python -m lldist.info out.h5 | head`): what it wanted is out;
        # point stdout at nothing so the interpreter's final flush does not complain
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        traceback.print_exc()
        where = getattr(e, "lldist_failure", "failed")  # "rank 0 on host failed in chunk 3 (cells 9..11)"
        print(f"lldist: error: {where}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1


def finish(code: int, closed=lambda: True) -> None:
    """End a command's process with `code`. Once lldist's work is done and every file it wrote
    is closed (`closed()`), the interpreter's own teardown is skipped (os._exit after flushing
    and finalizing MPI): torch's destructors fault about 110 MiB of its libraries' pages in on
    every rank and take a second or more, for nothing a command needs. Otherwise a plain exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not closed():
        sys.exit(code)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    import os
    os._exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' rule for bad input: one line and exit status 2 (through
    run_cli), instead of a usage block; --help still prints the whole usage. `doc`: the
    command module's docstring, whose first paragraph is the description."""

    def __init__(self, *args, doc: str = None, **kwargs):
        if doc is not None:
            kwargs.setdefault("description", " ".join(doc.strip().split("\n\n")[0].split()))
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (--help for the options)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v

