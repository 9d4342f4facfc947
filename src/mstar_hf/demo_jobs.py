"""A demo stage run in its own process beside the others: the report generator trains while the main
process runs the shuffled-pairing control, Stage 2 and its features.

The demo's models are tiny, so every step is per-op overhead rather than arithmetic, and a second
intra-op thread buys nothing (the report generator: 22.7 s for 200 steps on one thread against 29.2 s on
two; Stage 1: 15.7 s against 15.8 s). Two stages on one core each use a 2-core machine twice over. The
job runs on one thread wherever it runs, so its result does not depend on the machine's core count.

    python -m mstar_hf.demo_jobs PARENT_PID MODULE [ARGS...]

runs `MODULE.main(ARGS)` (a training entry point) and exits as soon as the process PARENT_PID is gone,
so a demo that is killed never leaves a job writing into the folder its resumed run starts again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# how often an orphaned job checks for its parent
_PARENT_POLL_S = 0.5
# CPU seconds of the jobs that ended: os.times() counts a reaped child wherever the parent then is, so a
# stage timed in the parent subtracts what it takes from here
_reaped_cpu_s = [0.0]


def reaped_cpu_s() -> float:
    """CPU seconds of all ended jobs of this process so far."""
    return _reaped_cpu_s[0]


class BackgroundJob:
    """`module.main(argv)` in a child Python process on `threads` threads; its output goes to `log_path`."""

    def __init__(self, name: str, module: str, argv: list[str], log_path: str | Path, threads: int = 1):
        self.name, self.module, self.argv, self.log_path, self.threads = name, module, list(argv), Path(log_path), threads
        self.proc = None
        self.wall_s = self.cpu_s = None
        self._start = None
        self._waiter = None

    def start(self) -> "BackgroundJob":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the job
            self._start = time.time()
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), self.module, *self.argv],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._waiter = threading.Thread(target=self._reap, name=f"wait-{self.name}", daemon=True)
        self._waiter.start()
        return self

    def __enter__(self) -> "BackgroundJob":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _reap(self):
        if not hasattr(os, "wait4"):  # Windows: no per-child CPU time
            self.proc.wait()
            self.wall_s, self.cpu_s = time.time() - self._start, 0.0
            return
        # wait4 gives this child's own CPU time (the demo's other children are its extraction workers)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.wall_s = time.time() - self._start
        self.cpu_s = usage.ru_utime + usage.ru_stime
        _reaped_cpu_s[0] += self.cpu_s
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def wait(self) -> None:
        """Blocks until the job ends; raises RuntimeError with the end of its log if it failed."""
        self._waiter.join()
        if self.proc.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} failed (exit status {self.proc.returncode}); its log is {self.log_path}:\n"
                               f"{tail}")

    def stop(self) -> None:
        """Ends the job if it still runs (the demo failed or was interrupted elsewhere)."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.terminate()
            except ProcessLookupError:
                pass
            self._waiter.join(timeout=10)
            if self.proc.returncode is None:
                self.proc.kill()
                self._waiter.join()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _run(argv: list[str]) -> int:
    import importlib

    parent_pid, module, args = int(argv[0]), argv[1], argv[2:]
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    return int(importlib.import_module(module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
