"""``python -m ablations.worker NAME --storage URL``: one more worker on an existing study.

Start it N times, on one machine or many, once ``python -m ablations.study NAME --storage URL
--create-only`` (or a running ``python -m ablations.study NAME``) has created the study: each
worker claims queued trials one at a time until none is left, so every grid point and seed runs
exactly once. Workers take every setting from the study in the storage (the trials' harness.run
options, the MLflow store and parent run), so their command lines stay this short; on other
machines the MLflow tracking URI must be a server they can reach (``--tracking-uri http://...``
when creating the study). A worker killed mid-trial loses only that trial: another worker (or
the next ``python -m ablations.study NAME``) marks it FAILED after ``--stale-after`` seconds
without a heartbeat and queues it again.
"""

from __future__ import annotations

import argparse
import os
import sys

from ablations.report import finish_parent_run
from ablations.storage import open_storage, redact, resolve_storage_url
from ablations.study import check_study_options, load_plan
from ablations.trials import DEFAULT_STALE_AFTER_S, pending_trials, work
from harness import quiet
from harness.errors import EXIT_INTERRUPTED, cli_entry, interruption


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ablations.worker",
        description="Join an existing ablation study and run its queued trials until none is left.",
        epilog="Create the study first: python -m ablations.study NAME --storage URL --create-only")
    parser.add_argument("study", metavar="NAME", help="the study's name (as created by python -m ablations.study)")
    parser.add_argument("--storage", required=True, metavar="URL",
                        help="the study's Optuna storage: sqlite:///FILE, journal:FILE or postgresql+psycopg2://...")
    parser.add_argument("--max-trials", type=int, default=None, metavar="N", help="stop after N trials")
    parser.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S, metavar="SECONDS",
                        help="fail and re-queue RUNNING trials without a heartbeat for this long "
                             f"(default: {DEFAULT_STALE_AFTER_S:g})")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own warnings, log lines and progress bars, hidden by default")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    quiet.offline_environment()
    args = build_parser().parse_args(argv)
    quiet.configure(verbose=args.verbose)
    check_study_options(args.stale_after, args.max_trials)
    url = resolve_storage_url(args.storage)
    storage = open_storage(url, create=False)
    plan = load_plan(args.study, storage, url)
    print(f"worker {os.getpid()}: joined study {plan.name!r} in {redact(url)}", flush=True)
    try:
        done = work(plan, storage, max_trials=args.max_trials, stale_after=args.stale_after)
    except KeyboardInterrupt as err:
        print(f"\n{interruption(err)}: the running trial is FAILED and queued again", file=sys.stderr)
        return EXIT_INTERRUPTED
    finish_parent_run(plan, storage)  # the last worker to finish ends the study's MLflow run FINISHED
    waiting, running = pending_trials(plan, storage)
    if waiting and args.max_trials is not None and done >= args.max_trials:
        why = f"stopped at --max-trials {args.max_trials} with {waiting} trial(s) still queued"
    else:
        why = "nothing left to claim" + (f" ({len(running)} trial(s) still running in other workers)" if running else "")
    print(f"worker {os.getpid()}: ran {done} trial(s); {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
