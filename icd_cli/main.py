"""The `icd` click group: every command is registered here, one line each.

A new command lives in the module of its concern (`core`: local runs; `service`: the server and
workers; `study`: local studies) and is added below with `main.add_command(...)`. Modules keep heavy
imports (torch, the FastAPI app) inside the command bodies, so `icd --help` and the service
commands start fast and a parent of GPU workers never initialises CUDA.
"""

from __future__ import annotations

import click

from . import client, core, deploy, service, study, sweep, teacher, tokens


@click.group()
@click.version_option(package_name="icd-service", prog_name="icd")
def main() -> None:
    """ICD: distillation experiments for object detectors, on the command line or as a service."""


# Local runs (icd_core in this process).
main.add_command(core.train_cmd)
main.add_command(core.eval_cmd)
main.add_command(core.shapes_group)
main.add_command(deploy.export_cmd)
main.add_command(deploy.predict_cmd)
main.add_command(study.study_command)
main.add_command(sweep.sweep_command)
main.add_command(teacher.import_teacher_cmd)
# The service.
main.add_command(service.serve)
main.add_command(service.worker_cmd)
main.add_command(service.check_worker)
main.add_command(service.db)
main.add_command(tokens.token)
# The command-line client of a running service (submit, jobs, status, logs, wait, download, cancel, retry)
# and the offline spec check (validate).
for _command in client.CLIENT_COMMANDS:
    main.add_command(_command)
