"""``dicom-node jobs [--failed]``: list recent jobs."""

from __future__ import annotations

from dicom_node.commands._common import add_config_argument, config_from, open_db

NAME = "jobs"
HELP = "list recent jobs (newest first)"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("--failed", action="store_true", help="only failed jobs")
    parser.add_argument("--limit", type=int, default=50)


def run(args) -> int:
    from dicom_node.jobs import age, list_jobs

    rows = list_jobs(open_db(config_from(args)), failed_only=args.failed, limit=args.limit)
    print(f"{'ID':>6} {'KIND':8} {'STATE':10} {'TRIES':>5} {'AGE':>6}  SERIES / TARGET / LAST ERROR")
    for j in rows:
        target = j.params.get("destination") or j.params.get("pipeline") or ""
        err = (j.last_error or "").splitlines()[0][:100] if j.last_error else ""
        print(f"{j.id:>6} {j.kind:8} {j.state:10} {j.attempts:>3}/{j.max_attempts:<1} {age(j.created_at):>6}  "
              f"{j.series_instance_uid} -> {target} {err}")
    if not rows:
        print("no jobs" + (" failed" if args.failed else ""))
    return 0
