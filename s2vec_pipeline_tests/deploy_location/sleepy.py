"""Test-only code location for the run-monitoring test: a job tagged like the training job
(``s2vec/stage: train``, limit 1 in docker/dagster.yaml) whose op records its process id and
sleeps. The in-process executor keeps the op in the run worker process, so killing that pid
kills the run worker itself (what a crash or the OOM killer does). The same op untagged shows
when the queue is served past a held-back training run."""

import os
import time
from pathlib import Path

import dagster as dg


@dg.op(config_schema={"seconds": float, "pid_file": str})
def sleep_and_record_pid(context: dg.OpExecutionContext) -> None:
    Path(context.op_config["pid_file"]).write_text(str(os.getpid()))
    time.sleep(context.op_config["seconds"])


@dg.job(tags={"s2vec/stage": "train"}, executor_def=dg.in_process_executor)
def sleepy_train() -> None:
    sleep_and_record_pid()


@dg.job(executor_def=dg.in_process_executor)
def sleepy_untagged() -> None:
    sleep_and_record_pid()


defs = dg.Definitions(jobs=[sleepy_train, sleepy_untagged])
