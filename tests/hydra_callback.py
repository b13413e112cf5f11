"""A user's own Hydra callback, as a researcher would register one: it writes when each job starts and
ends (and what it returned) to the JSON-lines file named by $JOB_EVENTS."""

import json
import os
import time

from hydra.experimental.callback import Callback


class JobEvents(Callback):
    def _write(self, **event) -> None:
        with open(os.environ["JOB_EVENTS"], "a") as fh:
            fh.write(json.dumps({"time": time.time(), **event}) + "\n")

    def on_job_start(self, config, **kwargs) -> None:
        self._write(event="start", num=config.hydra.job.num, output_dir=config.hydra.runtime.output_dir)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = job_return.return_value
        self._write(event="end", num=config.hydra.job.num, status=job_return.status.name,
                    return_value=value if isinstance(value, float) else repr(value),
                    working_dir=job_return.working_dir)
