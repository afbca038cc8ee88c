"""Two local processes with 4 CPU devices each (gloo collectives) train like one 8-device process,
save from both processes and resume."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from conftest import binary_env
from tests.helpers import losses

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = [
    f"--config={ROOT / 'experiments' / 'configs' / 'moe.py'}:tiny", "--config.total_steps=4",
    "--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.eval_every_steps=4",
    "--config.eval_batches=1", "--config.data.batch_size=8", "--config.data.seq_len=32",
    "--config.data.max_bytes=524288", "--config.model.num_layers=2", "--config.model.hidden_size=32",
    "--config.model.num_heads=2", "--config.model.ffn_size=64", "--config.model.max_seq_len=32",
    "--config.moe.experts=8", "--config.mesh.expert=4",
]


def _env(devices):
    return binary_env(devices)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, *extra):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train.py"), *FLAGS, *extra,
                               f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_equal_one_and_resume(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), *FLAGS, f"--workdir={tmp_path / 'one'}"],
                   env=_env(8), check=True, capture_output=True)
    _two_processes(tmp_path / "two", "--config.stop_after_steps=2")  # both processes save step 2
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2"]
    _two_processes(tmp_path / "two")  # both restore step 2 and go on to 4
    one, two = list(losses(tmp_path / "one").values()), list(losses(tmp_path / "two").values())
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-6)
