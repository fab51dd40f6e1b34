"""vllm_nsa.engine_runner's isolated jobs (no engine: plain processes stand in for one)."""
import os
import sys
import time

from vllm_nsa.engine_runner import run_isolated

# A job that leaves a child behind, as an eval worker that ends with os._exit leaves its
# engine core: the child sleeps far longer than the test, and its pid goes to a file.
LEAVES_A_CHILD = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(str(child.pid))
os._exit(0)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child that nobody reaped yet is a zombie: gone for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_isolated_job_leaves_no_process_behind(tmp_path):
    pid_file = tmp_path / "child.pid"
    assert run_isolated([sys.executable, "-c", LEAVES_A_CHILD, str(pid_file)],
                        env=os.environ, log_path=tmp_path / "job.log", timeout=60) is None
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_timed_out_job_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    hangs = LEAVES_A_CHILD.replace("os._exit(0)", "import time; time.sleep(300)")
    error = run_isolated([sys.executable, "-c", hangs, str(pid_file)], env=os.environ,
                         log_path=tmp_path / "job.log", timeout=5)
    assert error == "timed out after 5 s"
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)
