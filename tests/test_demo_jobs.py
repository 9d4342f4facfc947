"""`demo_jobs.BackgroundJob`: a training entry point in its own process beside the demo's other stages:
its result, its failure (with its log), its CPU time kept apart, and no orphan when the demo dies."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from mstar_hf.demo_jobs import BackgroundJob, reaped_cpu_s

JOB_MODULE = '''
import os, sys, time

def main(argv):
    mode = argv[0]
    if mode == "write":
        import torch
        with open(argv[1], "w") as handle:
            handle.write(f"{torch.get_num_threads()} {os.environ['OMP_NUM_THREADS']}")
        start = time.process_time()
        while time.process_time() - start < 0.3:  # some CPU time to account for
            pass
        return 0
    if mode == "fail":
        print("the features file holds 64-d features, the aggregator expects 128", file=sys.stderr)
        return 3
    if mode == "sleep":
        with open(argv[1], "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(120)
    return 0
'''


@pytest.fixture
def job_module(tmp_path, monkeypatch):
    (tmp_path / "mstar_test_job.py").write_text(JOB_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "mstar_test_job"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not this process counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = f"/proc/{pid}/stat"
    return not (os.path.exists(stat) and open(stat).read().rsplit(")", 1)[1].split()[0] == "Z")


def _wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text()):
        assert time.time() < deadline, f"{path} was never written"
        time.sleep(0.1)
    return path.read_text()


def test_a_job_runs_on_one_thread_and_its_cpu_time_is_its_own(job_module, tmp_path):
    before = reaped_cpu_s()
    with BackgroundJob("a test job", job_module, ["write", str(tmp_path / "out.txt")], tmp_path / "logs" / "job.log") as job:
        job.start().wait()
    assert (tmp_path / "out.txt").read_text() == "1 1"  # one torch thread, whatever the machine
    assert job.proc.returncode == 0 and job.wall_s > 0 and job.cpu_s >= 0.3
    # the demo's stage timer subtracts what the ended jobs used, so no stage is charged for them
    assert reaped_cpu_s() - before == pytest.approx(job.cpu_s)
    assert (tmp_path / "logs" / "job.log").is_file()


def test_a_failed_job_raises_with_its_log(job_module, tmp_path):
    job = BackgroundJob("the report generator", job_module, ["fail"], tmp_path / "job.log").start()
    with pytest.raises(RuntimeError) as err:
        job.wait()
    message = str(err.value)
    assert "the report generator failed (exit status 3)" in message and str(tmp_path / "job.log") in message
    assert "the aggregator expects 128" in message  # the end of its log


def test_stop_ends_a_running_job(job_module, tmp_path):
    job = BackgroundJob("a long job", job_module, ["sleep", str(tmp_path / "pid")], tmp_path / "job.log").start()
    pid = int(_wait_for(tmp_path / "pid"))
    job.stop()
    assert job.proc.returncode is not None and not _alive(pid)


def test_a_job_exits_when_the_demo_is_killed(job_module, tmp_path):
    """A demo killed with SIGKILL runs no clean-up: its job notices on its own and exits (else it would go on
    writing into the folder that the resumed demo starts again)."""
    parent = textwrap.dedent(f"""
        import os, time
        from mstar_hf.demo_jobs import BackgroundJob
        BackgroundJob("orphan", {job_module!r}, ["sleep", {str(tmp_path / "pid")!r}], {str(tmp_path / "job.log")!r}).start()
        time.sleep(120)
    """)
    demo = subprocess.Popen([sys.executable, "-c", parent])
    try:
        pid = int(_wait_for(tmp_path / "pid"))
        demo.kill()
        demo.wait()
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the job outlived the killed demo"
    finally:
        demo.kill()
