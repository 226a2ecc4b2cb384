"""Local processes (`--cluster local`, or `auto` without SLURM) with SLURM's guarantees.

submitit's local executor starts one controller process per job (its pid is the job id), which
starts the tasks and waits for them. Left as it is, it differs from SLURM where it matters for
training:
- `kill -USR2 JOBID` (what `scancel --signal=USR2 JOBID` is on SLURM) killed the controller: the
  signal's default action, since only the tasks handle it;
- a task that ends (failed, or rank 0 requeuing after a checkpoint) left the others running: a
  rank waiting in a collective, or for a requeue that only SLURM carries out, until the time limit.

Here the controller forwards SIGUSR2 to every task (and SIGTERM, as submitit's already does), and
ends every task as soon as one ends non-zero, as SLURM ends a job whose rank failed (srun
--kill-on-bad-exit) or that requeues; a requeue then restarts all of them, with the restart count
in ENAT_LOCAL_RESTART_COUNT (SLURM_RESTART_COUNT's role). The tasks end themselves when the
controller dies (launch/jobs.py), since no SLURM daemon is left to do it.

    python -m launch.local FOLDER     started by LocalExecutor below, never by hand
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.local import local

RESTART_ENV = "ENAT_LOCAL_RESTART_COUNT"


class LocalExecutor(submitit.LocalExecutor):
    """submitit's, starting the controller below instead of its own."""

    def _submit_command(self, command: str):
        tasks = self.parameters.get("tasks_per_node", 1)
        gpus = self.parameters.get("gpus_per_node", 0)
        env = dict(os.environ, SUBMITIT_LOCAL_NTASKS=str(tasks), SUBMITIT_LOCAL_COMMAND=command,
                   SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                   SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                   SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_STDERR_TO_STDOUT="",
                   SUBMITIT_EXECUTOR="local", CUDA_VISIBLE_DEVICES=",".join(str(k) for k in range(gpus)),
                   SUBMITIT_LOCAL_WITH_SHELL="")
        process = subprocess.Popen([sys.executable, "-m", "launch.local", str(self.folder)], env=env)
        return local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(tasks)))


class Controller(local.Controller):
    def __init__(self, folder: Path):
        super().__init__(folder)  # forwards SIGTERM to the tasks
        signal.signal(signal.SIGUSR2, self._forward_signal)

    def wait(self, freq: int = 24) -> list:
        """submitit's, except that the first task to end non-zero ends the wait (run() then ends
        the others); its time-limit signal as before."""
        almost_timeout = freq * (self.timeout_s - self.signal_delay_s)
        for step in range(freq * self.timeout_s):
            codes = [t.poll() for t in self.tasks]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                return codes
            if step == almost_timeout:
                self._forward_signal(local.LocalJobEnvironment._usr_sig())
            time.sleep(1.0 / freq)
        return [t.poll() for t in self.tasks]

    def run(self, max_retry: int = 6) -> None:
        for restart in range(max_retry):
            os.environ[RESTART_ENV] = str(restart)  # the tasks inherit it
            try:
                self.start_tasks()
                codes = self.wait()
                if local.LOCAL_REQUEUE_RETURN_CODE not in codes:
                    break
            finally:
                self.kill_tasks()  # SIGINT, then SIGKILL 1 s later, to the tasks still running


if __name__ == "__main__":
    Controller(Path(sys.argv[1])).run()
