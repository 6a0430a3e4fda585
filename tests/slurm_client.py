"""Snakemake's command line, polling SLURM at a fixed short interval (CI only).

The SLURM executor plugin backs off between status checks (+10 s after every check that
finds no finished job, up to 180 s), so on the CI cluster a 14-s job is seen as finished
after about 33 s, and the ``slurm`` tests spent most of their 15 minutes waiting. Here the
client polls every ``--seconds-between-status-checks`` instead, which only changes how
soon Snakemake notices a finished job: submission, the jobs and their status queries are
the plugin's own. Run as ``python tests/slurm_client.py <snakemake arguments>``.
"""

from __future__ import annotations

import sys

from snakemake.cli import main
from snakemake_executor_plugin_slurm import Executor


def _fixed_interval(executor: Executor) -> float:
    return executor.workflow.remote_execution_settings.seconds_between_status_checks


if __name__ == "__main__":
    # The plugin sets the next interval after each check; the setter drops its backoff.
    Executor.next_seconds_between_status_checks = property(_fixed_interval, lambda executor, value: None)
    sys.exit(main())
