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
