"""qbdl.experiment.shard in a real gloo process group: the batches a rank takes, and the group torn down at exit."""

import subprocess
import sys

from qbdl.experiment.shard import Shard, cpu_threads_per_rank

EXIT_SCRIPT = """
import atexit, os, tempfile
import torch.distributed as dist
from qbdl.experiment.shard import destroy_group_at_exit
# registered first, so it runs last (atexit is LIFO): it sees what the qbdl handler left
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
destroy_group_at_exit()  # no group yet: registers nothing
store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
destroy_group_at_exit()
destroy_group_at_exit()  # idempotent
print("handlers:", atexit._ncallbacks(), flush=True)
"""


def test_a_gloo_group_is_destroyed_at_exit_by_the_registered_handler():
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialized at exit: False" in proc.stdout
    handlers = int(proc.stdout.split("handlers:")[1].split()[0])
    without = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT.replace("destroy_group_at_exit()", "pass")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "initialized at exit: True" in without.stdout  # what Lightning leaves a gloo group as
    assert handlers == int(without.stdout.split("handlers:")[1].split()[0]) + 1  # one handler, not three


def test_each_rank_takes_every_world_th_batch():
    batches = list(range(7))
    got = [[i for i, _ in Shard(r, 3).batches(batches)] for r in range(3)]
    assert got == [[0, 3, 6], [1, 4], [2, 5]]
    assert [i for i, _ in Shard().batches(batches)] == batches
    assert 1 <= cpu_threads_per_rank(2) and cpu_threads_per_rank(10**6) == 1
