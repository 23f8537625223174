"""`evomerge jobs ...`: searches submitted to a Ray cluster (`evomerge submit`), through its job server.

Commands only: parse, call (evomerge.search.jobs, the module that talks to Ray's job server), print. Errors (an
unreachable address, an unknown job id) are `JobError`s: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from evomerge.cli.usage import UsageParser, help_when_bare


def add_jobs_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `jobs list|status|logs|stop|resume` to the `evomerge` parser (`sub`: its sub-parsers)."""
    jobs = sub.add_parser("jobs", parents=[common], help="list, follow, stop and resume searches submitted to a "
                          "Ray cluster", description="Searches submitted with `evomerge submit`, through the "
                          "cluster's job server (the dashboard address, e.g. http://127.0.0.1:8265).")
    help_when_bare(jobs)
    jobs_sub = jobs.add_subparsers(title="sub-commands", metavar="SUBCOMMAND", parser_class=UsageParser)
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")

    ls = jobs_sub.add_parser("list", parents=[common, address], help="the cluster's jobs: id, status, run "
                             "directory")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cmd_list)

    st = jobs_sub.add_parser("status", parents=[common, address], help="a job's status and its run directory")
    st.add_argument("job_id", help="the id `evomerge submit` printed (raysubmit_...)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_cmd_status)

    logs = jobs_sub.add_parser("logs", parents=[common, address], help="a job's output (the search's log)")
    logs.add_argument("job_id", help="the job id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_cmd_logs)

    stop = jobs_sub.add_parser("stop", parents=[common, address], help="stop a job; its run can be resumed",
                               description="Stop the job (SIGTERM, then SIGKILL) and wait for it to end. The run "
                               "directory stays consistent: resume it with `evomerge jobs resume JOB_ID` (on the "
                               "cluster) or `evomerge resume RUN_DIR` (where the run directory is).")
    stop.add_argument("job_id", help="the job id")
    stop.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the job to end (default: 60)")
    stop.set_defaults(func=_cmd_stop)

    resume = jobs_sub.add_parser("resume", parents=[common, address], help="resume the run of a stopped or "
                                 "failed job, as a new job on the cluster",
                                 description="Submit `evomerge resume RUN_DIR --address auto` for the run "
                                 "directory of an ended job; finished candidates come from the ledger.")
    resume.add_argument("job_id", help="the id of the stopped or failed job")
    resume.set_defaults(func=_cmd_resume)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _cmd_list(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import list_jobs

    jobs = list_jobs(args.address)
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("job id", no_wrap=True), Column("status", no_wrap=True), "command",
                  Column("run directory", overflow="fold"), "started", "ended", title=f"Ray jobs at {args.address}")
    for j in jobs:
        table.add_row(j["id"], j["status"], j["command"], j["run_dir"], _when(j["start"]), _when(j["end"]))
    Console().print(table)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import job_info

    info = job_info(args.address, args.job_id)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"job {info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    if info["start"]:
        print(f"started {_when(info['start'])}" + (f", ended {_when(info['end'])}" if info["end"] else ""))
    _print_run_dir(info, args.address)
    return 0


def _print_run_dir(info: dict, address: str) -> None:
    run_dir = info["run_dir"]
    if not run_dir:
        return
    print(f"run directory: {run_dir} (on the node that ran the job: the head node, or shared storage)")
    if info["status"] in ("STOPPED", "FAILED"):
        print(f"resume: evomerge jobs resume {info['id']} --address {address}   (or, where the run directory is: "
              f"evomerge resume {run_dir})")
    elif info["status"] == "SUCCEEDED":
        print(f"front: evomerge status {run_dir}")


def _cmd_logs(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import follow_job_logs, job_logs

    if not args.follow:
        sys.stdout.write(job_logs(args.address, args.job_id))
        return 0
    for chunk in follow_job_logs(args.address, args.job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import stop_job

    info = stop_job(args.address, args.job_id, wait_s=args.wait)
    print(f"job {info['id']}: {info['status']}")
    _print_run_dir(info, args.address)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.jobs import submit_resume

    job_id, run_dir = submit_resume(args.address, args.job_id)
    print(f"resuming {run_dir} as job {job_id}", file=sys.stderr)
    print(job_id)
    return 0
