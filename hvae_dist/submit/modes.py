"""How `hvae submit` can run besides sbatch: `--dry-run` (print the job scripts, queue nothing) and `--local`
(the same chain of job callables through submitit's LocalExecutor on this machine, one stage after another);
and `--time` in every form sbatch takes.

A dry run needs no cluster: `DryRunExecutor` is submitit's SlurmExecutor with the submission replaced by a
print of the sbatch script that submitit would write (its own `_make_sbatch_string`) and of the parameters;
the jobs it returns are placeholders named DRY-1, DRY-2, ... (an array: DRY-2_0, DRY-2_1, ...), so that the
printed dependencies (afterok:DRY-1) show the chain.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIME_FORMS = ("MIN", "MIN:SEC", "H:MIN:SEC", "D-H", "D-H:MIN", "D-H:MIN:SEC")
"""sbatch --time's forms (SLURM's man page: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
"days-hours:minutes", "days-hours:minutes:seconds")."""

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                      r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def parse_slurm_time(text: str) -> int:
    """A time limit as sbatch reads it, in whole minutes (seconds round up, as SLURM rounds them);
    argparse.ArgumentTypeError naming the forms when it is none of them or is 0."""
    m = _TIME_RE.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a time limit as sbatch takes it: {', '.join(TIME_FORMS)} "
                                         "(e.g. 90, 02:00:00, 1-12:00:00)")
    if m["days"] is not None:
        days, hours = int(m["days"]), int(m["dh"])
        minutes, seconds = int(m["dm"] or 0), int(m["ds"] or 0)
    elif m["c"] is not None:                                     # H:MIN:SEC
        days, hours, minutes, seconds = 0, int(m["a"]), int(m["b"]), int(m["c"])
    else:                                                        # MIN or MIN:SEC
        days, hours, minutes, seconds = 0, 0, int(m["a"]), int(m["b"] or 0)
    total = days * 1440 + hours * 60 + minutes + (seconds + 59) // 60
    if total < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a time limit must be at least 1 minute")
    return total


@dataclass
class DryRunJob:
    """What a placeholder job offers the callers of `Executor.submit`: an id and a log folder."""

    job_id: str
    paths: Any
    fn: Any = None


class DryRunExecutor:
    """submitit's SlurmExecutor for printing: `update_parameters` checks the parameters as submitit does, and
    each submission prints its sbatch script instead of calling sbatch. `counter` numbers the placeholders of
    one `hvae submit` (shared by its executors)."""

    def __init__(self, folder: str | Path, max_num_timeout: int, counter: list[int], out=None):
        import submitit

        class _Printing(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:     # no srun needed: nothing is submitted
                return 1

        self._ex = _Printing(folder=str(folder), max_num_timeout=max_num_timeout)
        self._counter, self._out = counter, out
        self._batch: list[Any] | None = None

    @property
    def parameters(self) -> dict:
        return self._ex.parameters

    def update_parameters(self, **kwargs: Any) -> None:
        self._ex.update_parameters(**kwargs)

    def batch(self):
        """Submissions inside it form one array job, as in submitit."""
        import contextlib

        @contextlib.contextmanager
        def collect():
            self._batch = []
            try:
                yield
                jobs = self._print(self._batch)
                for placeholder, job in zip(self._batch, jobs):
                    placeholder.job_id, placeholder.paths = job.job_id, job.paths
            finally:
                self._batch = None
        return collect()

    def submit(self, fn: Any) -> DryRunJob:
        job = DryRunJob("", None, fn)
        if self._batch is not None:
            self._batch.append(job)
            return job
        return self._print([job])[0]

    def _print(self, jobs: list[DryRunJob]) -> list[DryRunJob]:
        from submitit.slurm.slurm import _make_sbatch_string

        self._counter[0] += 1
        base = f"DRY-{self._counter[0]}"
        params = dict(self._ex.parameters)
        if len(jobs) > 1:
            params["map_count"] = len(jobs)
        text = _make_sbatch_string(command=self._ex._submitit_command_str, folder=self._ex.folder, **params)
        ids = [base] if len(jobs) == 1 else [f"{base}_{i}" for i in range(len(jobs))]
        out = self._out or sys.stdout
        what = type(jobs[0].fn).__name__ + (f" x {len(jobs)} (array)" if len(jobs) > 1 else "")
        print(f"----- dry run: job {base}: {what}; sbatch parameters:", file=out)
        print(json.dumps(params, indent=2, default=str, sort_keys=True), file=out)
        print(f"----- the sbatch script of {base}:", file=out)
        print(text.rstrip(), file=out)
        print(f"----- end of {base}", file=out)
        return [DryRunJob(i, _Paths(str(self._ex.folder).replace("%j", i))) for i in ids]


@dataclass
class _Paths:
    folder: str


def make_local_executor(folder: str | Path, time_min: int, max_num_timeout: int):
    """submitit's LocalExecutor (one node, one task: jobs run as child processes of this command)."""
    import submitit

    ex = submitit.LocalExecutor(folder=str(Path(folder) / "%j"), max_num_timeout=max_num_timeout)
    ex.update_parameters(timeout_min=time_min, tasks_per_node=1, nodes=1)
    return ex


def wait_local(jobs: list, what: str, out=None) -> list:
    """The results of local jobs, in order; a failed job raises SubmitError with its log's last lines."""
    from hvae_dist.errors import SubmitError

    results = []
    for job in jobs:
        try:
            results.append(job.result())
        except Exception as e:   # submitit's FailedJobState etc.: the job's own traceback is in its log
            tail = "\n".join(str(e).strip().splitlines()[-6:])
            raise SubmitError(f"local {what} job {job.job_id} failed (logs in {job.paths.folder}): {tail}") from None
    print(f"local {what} done: {len(jobs)} job(s)", file=out or sys.stdout, flush=True)
    return results
