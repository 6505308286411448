"""The kernels compile for A100 (sm_80) and H100 (sm_90) without register spills or a shared-memory overflow.

No GPU is needed: `kernels.codegen` compiles each launch the launchers would make ahead of time with
Triton's bundled ptxas. It runs in a child process because this one imported the kernels under the
interpreter, which has nothing to compile.
"""
import json
import os
import subprocess
import sys

import pytest

ALL_KERNELS = {"stats_partials_kernel", "merge_partials_kernel", "finish_partials_kernel", "row_terms_kernel",
               "grad_logits_kernel", "grad_partials_kernel", "region_factors_kernel", "region_pool_fwd_kernel",
               "region_pool_bwd_kernel"}


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    report = tmp_path_factory.mktemp("codegen") / "launches.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.codegen", "--json", str(report)],
                          env=env, capture_output=True, text=True, timeout=900)
    return done, json.loads(report.read_text()) if report.exists() else []


def test_every_kernel_is_compiled_for_both_archs_and_all_dtypes(codegen):
    done, launches = codegen
    assert launches, done.stderr
    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            compiled = {launch["kernel"] for launch in launches if launch["arch"] == arch and launch["dtype"] == dtype}
            # fp16 always takes the fused backward: its d(loss)/d(dot) needs per-tile rescaling; the statistics'
            # merge and finish and the per-row loss terms read fp32 statistics only, whatever the features' dtype
            expected = ALL_KERNELS - ({"grad_logits_kernel"} if dtype == "fp16" else set()) - (
                set() if dtype == "fp32" else {"merge_partials_kernel", "finish_partials_kernel", "row_terms_kernel"})
            assert compiled | {"region_factors_kernel"} == expected, (arch, dtype, compiled)
    pool_forwards = [launch for launch in launches if launch["kernel"] == "region_pool_fwd_kernel"]
    assert {launch["constants"]["NORMALIZE"] for launch in pool_forwards} == {False, True}
    # the second-pass normalisation writes fp32 rows from half-precision tokens
    assert {(launch["dtype"], launch["out_dtype"]) for launch in pool_forwards} >= {("bf16", "fp32"), ("bf16", "bf16")}


def test_no_launch_spills_registers_or_overflows_shared_memory(codegen):
    done, launches = codegen
    assert done.returncode == 0, done.stderr
    assert all(launch["stack_bytes"] == 0 for launch in launches)
    assert all(0 < launch["registers"] <= 255 for launch in launches)
