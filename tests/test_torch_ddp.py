"""DistributedDataParallel with fastnn.torch ops and AdamW: 2 processes (gloo, 127.0.0.1) on halves of the
batch end with the parameters of one process trained on the whole batch. Skipped where torch is absent."""
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="fastnn.torch needs PyTorch (pip install 'fastnn[torch]')")
import torch.distributed as dist  # noqa: E402

import fastnn  # noqa: E402
import torch_ddp_worker as worker  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_ddp_two_processes_match_one(tmp_path):
    out = tmp_path / "params.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(fastnn.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(rank), "2", port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ddp_params = torch.load(out)
    x, t = worker.data()
    single = worker.train(worker.build(), x, t).state_dict()
    assert ddp_params.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp_params[k], single[k], rtol=1e-10, atol=1e-12)
    assert not torch.equal(single["0.weight"], worker.build().state_dict()["0.weight"])  # it did train
