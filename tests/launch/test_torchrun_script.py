"""launch/torchrun_pretrain.sh refuses a multi-node start that would hang, before torchrun starts."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "torchrun_pretrain.sh"


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "NODE_RANK"])
def test_several_nodes_without_the_rendezvous_address_or_node_rank_is_an_error(missing):
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "NODE_RANK")}
    env.update({"NNODES": "2", "MASTER_ADDR": "node-001", "NODE_RANK": "1"})
    del env[missing]
    result = subprocess.run(["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"NNODES=2 needs {missing} set on every node" in result.stderr


def _torchrun_arguments(tmp_path: Path, **settings: str) -> list[str]:
    """What the script hands torchrun, read from a stand-in `torchrun` first on PATH."""
    (tmp_path / "torchrun").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "torchrun").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("NNODES", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PATH": f"{tmp_path}:{env['PATH']}", "GPUS_PER_NODE": "2", **settings})
    result = subprocess.run(["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_one_node_without_a_port_runs_standalone_so_two_jobs_on_one_machine_both_start(tmp_path):
    """It passed --master_port 29500 to every single-node job: a second job on the same machine failed to bind."""
    arguments = _torchrun_arguments(tmp_path)
    assert "--standalone" in arguments and "--master_port" not in arguments


def test_a_port_given_or_several_nodes_rendezvous_at_the_address_given(tmp_path):
    assert _torchrun_arguments(tmp_path, MASTER_PORT="29611")[:9] == [
        "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "29611", "--nproc_per_node"]
    arguments = _torchrun_arguments(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="node-001")
    assert arguments[:8] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "node-001", "--master_port", "29500"]
