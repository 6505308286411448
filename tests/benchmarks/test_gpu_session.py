"""The GPU session driver keeps to its budget and says what is left: checked on the CPU with stand-in
steps, and every real step's command checked against the parser it will meet on the GPU."""
import importlib
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_session import BIGG_ARGUMENTS, STEPS, Step, main, run_session

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed here may wait to be reaped by a PID 1 that never does)."""
    time.sleep(0.5)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_steps_run_in_order_and_a_step_past_its_cap_is_killed_with_its_children(tmp_path):
    grandchild_pid = tmp_path / "grandchild.pid"
    spawns_and_hangs = ("import subprocess, sys, time; "
                        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                        f"open({str(grandchild_pid)!r}, 'w').write(str(child.pid)); "
                        "print('waiting', flush=True); time.sleep(120)")
    steps = [Step("quick", _python("print('hello from quick')"), 60, 0, "a quick one"),
             Step("hangs", _python(spawns_and_hangs), 3, 0, "one past its cap"),
             Step("fails", _python("raise SystemExit(4)"), 60, 0, "a failing one")]
    started = time.monotonic()
    outcomes = run_session(steps, tmp_path / "out", budget_s=120)
    assert time.monotonic() - started < 60
    assert [o.status for o in outcomes] == ["done", "cut off at 3 s", "failed"]
    assert outcomes[2].exit_status == 4
    assert not _running(int(grandchild_pid.read_text()))  # the whole process group went, not only the step
    log = (tmp_path / "out" / "session.log").read_text()
    assert log.index("===== quick") < log.index("hello from quick") < log.index("===== hangs") < log.index("waiting")
    report = (tmp_path / "out" / "steps.md").read_text()
    assert "| quick | done |" in report and "| fails | failed |" in report
    assert "--steps hangs fails`" in report


def test_a_step_cut_off_leaves_no_worker_of_its_own_session_behind(tmp_path):
    """torchrun starts its workers with start_new_session=True, and the trainer's worker answers SIGTERM by finishing
    its step and saving: a signal to the step's process group left it running, on the GPU, through the next steps."""
    worker_pid = tmp_path / "worker.pid"
    worker = ("import os, signal, time; signal.signal(signal.SIGTERM, lambda *_: None); "
              f"open({str(worker_pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    launcher = ("import subprocess, sys, time; "
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); time.sleep(120)")
    started = time.monotonic()
    (outcome,) = run_session([Step("torchrun_like", _python(launcher), 3, 0, "a launcher past its cap")],
                             tmp_path / "out", budget_s=60)
    assert outcome.status == "cut off at 3 s" and time.monotonic() - started < 30
    assert not _running(int(worker_pid.read_text()))


def test_a_step_needing_more_than_is_left_is_passed_over_and_the_last_is_cut_to_the_budget(tmp_path):
    steps = [Step("big", _python("print('never')"), 600, 500, "needs 500 s"),
             Step("sleeps", _python("import time; time.sleep(60)"), 600, 0, "cut to the budget")]
    outcomes = run_session(steps, tmp_path, budget_s=2)
    assert outcomes[0].status == "not started: needs 500 s, 2 s left"
    assert outcomes[1].status.startswith("cut off at") and outcomes[1].seconds < 20
    assert "never" not in (tmp_path / "session.log").read_text()
    assert "--steps big sleeps`" in (tmp_path / "steps.md").read_text()


def test_an_unknown_step_name_is_refused_naming_the_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--steps", "contrastive", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("step", [step for step in STEPS if step.command[1].startswith("benchmarks/")],
                         ids=lambda step: step.name)
def test_every_benchmark_step_parses_with_its_script(step, tmp_path):
    script = importlib.import_module(step.command[1].removesuffix(".py").replace("/", "."))
    args = script.parse_args([part.replace("{out}", str(tmp_path)) for part in step.command[2:]])
    assert args.output == tmp_path / "rows.md"


def test_every_test_path_of_the_pytest_steps_exists():
    for step in STEPS:
        if step.command[1:3] == ("-m", "pytest"):
            paths = [part.split("=", 1)[-1] for part in step.command if part.startswith(("tests/", "--ignore="))]
            assert paths and all((ROOT / path).exists() for path in paths), step.name


def test_the_bigg_run_is_a_valid_vit_bigg_zero3_config_with_checkpointing():
    from fineclip_ds.config import load_config
    from fineclip_ds.training.parallelize import load_deepspeed_config

    arguments = dict(zip(BIGG_ARGUMENTS[::2], BIGG_ARGUMENTS[1::2]))
    overrides = [value for flag, value in zip(BIGG_ARGUMENTS[::2], BIGG_ARGUMENTS[1::2]) if flag == "--set"]
    config = load_config(arguments["--recipe"], overrides + [f"train.max_steps={arguments['--max_steps']}"])
    assert config.model.name == "ViT-bigG-14" and config.model.grad_checkpointing
    assert config.data.source == "synthetic"
    assert load_deepspeed_config(str(ROOT / arguments["--deepspeed_config"]))["zero_optimization"]["stage"] == 3


def test_the_session_times_the_candidate_tiles_the_codegen_check_compiles():
    from benchmarks.gpu_session import CANDIDATE_TILES
    from kernels.contrastive.launch import CANDIDATE_HALF_TILES
    assert CANDIDATE_TILES == tuple("x".join(map(str, shape)) for shape in CANDIDATE_HALF_TILES)


def test_a_step_that_may_be_cut_off_names_each_test_as_it_passes():
    """-q and -v together cancel out: the kernel tests printed dots, so a step cut off at its cap did not say
    which test it had reached."""
    from benchmarks.gpu_session import STEPS
    command = next(step.command for step in STEPS if step.name == "kernel_tests")
    assert "-v" in command and "-q" not in command


def test_a_session_clears_what_an_earlier_call_left_in_tmp_and_its_own_bigg_run(tmp_path, monkeypatch):
    """A warm machine keeps /tmp: an earlier call's bigG checkpoint (~27 GB) and a cut-off make_regions' 7.5 GB
    model would fill the 64 GiB disk within two calls."""
    import benchmarks.gpu_session as session

    scratch = tmp_path / "scratch"
    earlier = [scratch / "fineclip_bigg_zero3_11" / "checkpoints", scratch / "make_regions_bench_x1" / "opt"]
    for folder in earlier:
        folder.mkdir(parents=True)
    (scratch / "unrelated").mkdir()
    own = scratch / "fineclip_bigg_zero3_22"
    monkeypatch.setattr(session, "SCRATCH", scratch)
    monkeypatch.setattr(session, "BIGG_RUN", own)

    def steps_that_train_bigg(steps, out, budget_s):
        assert not any(folder.exists() for folder in earlier)  # cleared before the first step
        own.mkdir()
        (own / "summary.json").write_text('{"samples_per_s": 1.0}')
        (out / "steps.md").write_text("steps")
        return []

    monkeypatch.setattr(session, "run_session", steps_that_train_bigg)
    (tmp_path / "out").mkdir()
    assert session.main(["--out", str(tmp_path / "out"), "--steps", "bigg_zero3"]) == 0
    assert (tmp_path / "out" / "bigg_summary.json").read_text() == '{"samples_per_s": 1.0}'
    assert sorted(path.name for path in scratch.iterdir()) == ["unrelated"]
