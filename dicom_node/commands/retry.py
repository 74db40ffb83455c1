"""``dicom-node retry JOB_ID``: requeue a failed job."""

from __future__ import annotations

from dicom_node.commands._common import add_config_argument, config_from, open_db
from dicom_node.errors import UserError

NAME = "retry"
HELP = "requeue a failed (or done) job now"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("job_id", type=int)


def run(args) -> int:
    from dicom_node import jobs

    factory = open_db(config_from(args))
    try:
        job = jobs.retry(factory, args.job_id)
    except (LookupError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"job {job.id} ({job.kind} of series {job.series_instance_uid}) queued again")
    return 0
