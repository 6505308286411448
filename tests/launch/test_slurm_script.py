"""launch/slurm_pretrain.sbatch requeues a job that a stop signal ended, and only such a job: run with
stand-ins for srun, scontrol and the trainer's python on PATH (the trainer's side, writing the file, is in
test_faults and below)."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIGNALLED_PRETRAIN = Path(__file__).with_name("signalled_pretrain.py")
FAKE_SRUN = """#!/usr/bin/env bash
# one task: the command after srun's two options, with the variables srun gives a task
echo "$1 $2" > "${SRUN_ARGS}"
shift 2
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 "$@"
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# the trainer: stopped by the time-limit signal when FAKE_PREEMPTED=1 (rank 0 writes the file)
printf '%s\\n' "$@" > "${PYTHON_ARGS}"
echo "${FINECLIP_REQUEUED:-}" > "${PYTHON_REQUEUED}"
echo "${MASTER_ADDR}:${MASTER_PORT}" > "${SRUN_MASTER}"
if [[ "${FAKE_PREEMPTED}" == 1 ]]; then echo 7 > "${FINECLIP_REQUEUE_FILE}"; fi
exit "${FAKE_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1" == show ]]; then echo node-001; else echo "$@" >> "${SCONTROL_CALLS}"; fi
"""


def _run_job(tmp_path: Path, preempted: bool, status: int = 0, stale_file: bool = False, job_id: int = 4242,
             job_args: tuple[str, ...] = (), scontrol: str | None = FAKE_SCONTROL, **extra_env: str) -> tuple[int, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = (("srun", FAKE_SRUN), ("scontrol", scontrol), ("python", FAKE_PYTHON))
    for name, text in ((name, text) for name, text in fakes if text is not None):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    if stale_file:  # an earlier allocation of the same job was requeued and left its file behind
        (tmp_path / ".fineclip-requeue-4242").write_text("3\n")
    calls = tmp_path / "scontrol_calls"
    outer = {name: value for name, value in os.environ.items() if name != "MASTER_PORT"}  # as on a fresh node
    env = {**outer, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node-001", "SCONTROL_CALLS": str(calls),
           "FAKE_PREEMPTED": "1" if preempted else "0", "FAKE_STATUS": str(status),
           "SLURM_CPUS_PER_TASK": "12", "SRUN_ARGS": str(tmp_path / "srun_args"),
           "SRUN_MASTER": str(tmp_path / "srun_master"), "PYTHON_ARGS": str(tmp_path / "python_args"),
           "PYTHON_REQUEUED": str(tmp_path / "python_requeued"), **extra_env}
    done = subprocess.run(["bash", str(REPO / "launch" / "slurm_pretrain.sbatch"), "--recipe", "vit-l-14", *job_args],
                          env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, calls.read_text() if calls.exists() else ""


@pytest.mark.parametrize("stale_file", [False, True])
def test_a_run_stopped_by_the_signal_is_requeued(tmp_path, stale_file):
    assert _run_job(tmp_path, preempted=True, stale_file=stale_file) == (0, "requeue 4242\n")
    assert not (tmp_path / ".fineclip-requeue-4242").exists()


@pytest.mark.parametrize("stale_file", [False, True])
def test_a_finished_run_is_not_requeued_even_after_an_earlier_requeue(tmp_path, stale_file):
    assert _run_job(tmp_path, preempted=False, stale_file=stale_file) == (0, "")


def test_a_failed_run_is_not_requeued_and_keeps_its_status(tmp_path):
    assert _run_job(tmp_path, preempted=False, status=3) == (3, "")


def test_srun_passes_the_cpus_per_task_on(tmp_path):
    """Slurm 22.05-23.02: srun does not inherit the batch script's --cpus-per-task."""
    _run_job(tmp_path, preempted=False)
    assert (tmp_path / "srun_args").read_text() == "--kill-on-bad-exit=1 --cpus-per-task=12\n"


def _resume_of_the_task(tmp_path: Path) -> str:
    """What launch/pretrain.py's argparse makes of the task's --resume options: the last one wins."""
    arguments = (tmp_path / "python_args").read_text().splitlines()
    assert arguments[0] == "launch/pretrain.py"
    return [arguments[index + 1] for index, argument in enumerate(arguments) if argument == "--resume"][-1]


def test_a_requeued_allocation_tells_the_trainer_to_continue_its_own_run(tmp_path):
    """sbatch ... --resume runs/a/checkpoints/step_00000500 --output_dir runs/b: the first allocation starts from
    step 500. Any allocation Slurm requeued (the script's own requeue, a node failure, a requeue by hand; Slurm
    counts them in SLURM_RESTART_COUNT) must continue runs/b's own checkpoint: a marker file the script wrote
    only for its own requeues made every other requeue start from step 500 again, and stop (exit 2) on finding
    runs/b's checkpoints. The trainer's side (FINECLIP_REQUEUED=1) is tested in tests/training/test_run_folder.py."""
    start = ("--resume", "runs/a/checkpoints/step_00000500", "--output_dir", "runs/b")
    assert _run_job(tmp_path, preempted=True, job_args=start) == (0, "requeue 4242\n")
    assert _resume_of_the_task(tmp_path) == "runs/a/checkpoints/step_00000500"
    assert (tmp_path / "python_requeued").read_text() == "0\n"
    for restarts in ("1", "2"):
        _run_job(tmp_path, preempted=False, job_args=start, SLURM_RESTART_COUNT=restarts)
        assert (tmp_path / "python_requeued").read_text() == "1\n"
    _run_job(tmp_path, preempted=False, job_args=start, SLURM_RESTART_COUNT="0", FINECLIP_REQUEUED="1")
    assert (tmp_path / "python_requeued").read_text() == "0\n"  # not taken over from the submitting shell
    assert not list(tmp_path.glob(".fineclip-*"))  # nothing left beside the job's log


def test_jobs_sharing_a_node_get_different_master_ports(tmp_path):
    """Two jobs on one node (fewer GPUs than the node has) both bound port 29500: the second one's rank 0 failed
    to start its store ('address already in use'). The port now follows the job id; MASTER_PORT still wins."""
    masters = []
    for job_id in (4242, 4243):
        _run_job(tmp_path, preempted=False, job_id=job_id)
        masters.append((tmp_path / "srun_master").read_text().strip())
    assert masters[0].startswith("node-001:") and masters[0] != masters[1]
    assert all(1024 < int(master.split(":")[1]) < 32768 for master in masters)  # below Linux's ephemeral range
    _run_job(tmp_path, preempted=False, MASTER_PORT="31337")
    assert (tmp_path / "srun_master").read_text() == "node-001:31337\n"


@pytest.mark.parametrize("scontrol", [None, "#!/usr/bin/env bash\necho 'slurm_load_jobs error' >&2; exit 1\n"],
                         ids=["missing", "failing"])
@pytest.mark.parametrize(("nodelist", "first"), [("node[01-03,07]", "node01"), ("gpu-a[7],gpu-b[1-2]", "gpu-a7"),
                                                 ("rack[2-3]-n[003-004]", "rack2-n003"), ("node-009", "node-009")])
def test_the_rendezvous_is_the_first_node_without_scontrol_hostnames(tmp_path, scontrol, nodelist, first):
    """`export MASTER_ADDR="$(scontrol show hostnames ... | head -n 1)"`: export hid a missing or failing scontrol
    from set -e, and every rank started with MASTER_ADDR empty. The first node now comes from the node list."""
    if scontrol is None and shutil.which("scontrol"):
        pytest.skip("a real scontrol is on PATH")
    assert _run_job(tmp_path, preempted=False, scontrol=scontrol, SLURM_JOB_NODELIST=nodelist)[0] == 0
    assert (tmp_path / "srun_master").read_text().split(":")[0] == first


def test_a_requeued_job_appends_to_its_log():
    """A requeued job keeps its id, so slurm-%j.out names the same file in every allocation, and Slurm opens it
    with O_TRUNC unless told to append (slurmstepd io_get_file_flags; JobFileAppend defaults to 0): without
    --open-mode=append each requeue erased the log of the allocations before it, the signal and save included."""
    script = (REPO / "launch" / "slurm_pretrain.sbatch").read_text()
    directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert "--requeue" in directives and "--output=slurm-%j.out" in directives
    assert "--open-mode=append" in directives


def _signalled_run(tmp_path: Path, max_steps: int, signal_at_step: int) -> Path:
    """The trainer's side: one process (no launcher) told to stop by SIGUSR1 during `signal_at_step`."""
    requeue_file = tmp_path / "requeue"
    env = {**os.environ, "FINECLIP_REQUEUE_FILE": str(requeue_file), "FINECLIP_TEST_SIGNAL_CALL": str(signal_at_step)}
    done = subprocess.run([sys.executable, str(SIGNALLED_PRETRAIN), "--deepspeed_config",
                           str(REPO / "ds_configs" / "zero2.json"), "--output_dir", str(tmp_path / "run"),
                           "--max_steps", str(max_steps), "--set", "data.num_workers=0", "--set", "data.max_boxes=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # slow on shared CPUs
    assert done.returncode == 0, done.stderr[-3000:]
    return requeue_file


@pytest.mark.slow
def test_a_signal_during_the_last_step_does_not_requeue_the_finished_run(tmp_path):
    """The run saved its last step and is done: a requeue would only start it again to train nothing."""
    requeue_file = _signalled_run(tmp_path, max_steps=2, signal_at_step=2)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2]
    assert not requeue_file.exists()
