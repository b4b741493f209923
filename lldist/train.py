"""Train the job's model and write its checkpoints.

    python -m lldist.train jobs/quickstart.yaml [--set train.epochs=5]

Writes `model.checkpoint` (final weights) and, beside it, `<stem>_epoch<N>.pt` after every
epoch, each with its metadata (lldist/runs/train.py). SIGTERM ends training within a batch,
keeping the epochs written so far.
"""

from __future__ import annotations

from .config import load_job
from .errors import ArgumentParser, UserError, finish, run_cli
from .store import all_closed
from .runs.train import train
from .transport.runner import install_sigterm


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m lldist.train", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set train.epochs=5 (repeatable)")
    args = ap.parse_args(argv)
    job = load_job(args.job, args.set)
    if job.train is None:
        raise UserError(f"{args.job}: the job has no 'train:' section")
    train(job, log=lambda s: print(s, flush=True), should_stop=install_sigterm())
    return 0


def cli() -> None:
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
