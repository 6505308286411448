"""Host memory of building a model from a run given as model.pretrained, against building it from the run's export.

Run: `python -m pytest benchmarks/bench_pretrained_memory.py --benchmark-only -s` (75 s on 2 CPU cores: it
trains ViT-B-16, 150M parameters, for one step under ZeRO-2 (1 process) and ZeRO-3 (2 processes) to have real
checkpoints, 4 GB on disk while it runs). Every rank of a job builds its model so, so the figures are per rank.

Each build runs in a fresh process, which reports its peak RSS above its RSS after the imports: Linux's VmHWM, reset
through /proc/self/clear_refs (ru_maxrss would start from the RSS of the pytest process it was forked from, which
Linux keeps across exec). That counts the model, any state dict held beside it, and the shards' fp32 weights, which
zero_to_fp32 reads through a memory map (page cache, which a node's ranks share); the Adam moments in the same files
are never read.

Target: a ZeRO-3 run peaks at most 1.25x the export (the model and one fp32 state dict, torch.load'ed): its tensors
are gathered one at a time into the built model (the model, its largest tensor and the mapped shards: 1.1x; gathered
all at once, as before, 1.5x). A ZeRO-2 run is recorded, with no target: zero_to_fp32 concatenates its shards into
one fp32 copy, lazy or not (1.5x).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fineclip_ds.export import export
from tests.training.launcher import run_pretrain, write_ds_config

MODEL = "ViT-B-16"
MEASURE = """
import sys
import deepspeed.utils.zero_to_fp32  # imported before the mark, as an export needs no DeepSpeed
from fineclip_ds.config import ModelConfig
from fineclip_ds.models.factory import create_fineclip
def kib(field): return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM (peak RSS) starts again from the RSS now
imported = kib("VmRSS")
create_fineclip(ModelConfig(name=sys.argv[1], pretrained=sys.argv[2]))
print((kib("VmHWM") - imported) * 1024)
"""


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A ZeRO-2 run, a ZeRO-3 run and the ZeRO-2 run's export; the text tower trains too (model.freeze_text=false),
    so that every weight is in the optimizer's shards, the part read lazily. Deleted afterwards (4 GB)."""
    root = tmp_path_factory.mktemp("pretrained_memory")
    paths = {}
    for name, processes, stage in (("zero2", 1, 2), ("zero3", 2, 3)):
        config = write_ds_config(root / f"{name}.json", micro_batch=1, stage=stage)
        run_pretrain(processes, config, root / name, "--max_steps", "1", "--set", f"model.name={MODEL}",
                     "--set", "model.freeze_text=false", "--set", "train.save_every=1", "--set", "data.max_boxes=2",
                     "--set", "optim.warmup_steps=0", "--set", "eval.every=0", timeout=600)
        paths[name] = root / name
    _, paths["export"] = export(paths["zero2"], root / "export" / "fineclip.pt")
    yield paths
    shutil.rmtree(root)


def peak_rss_bytes(pretrained: Path) -> int:
    """Peak RSS of create_fineclip(model.pretrained=`pretrained`) in a fresh process, above its imports'."""
    result = subprocess.run([sys.executable, "-c", MEASURE, MODEL, str(pretrained)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return int(result.stdout.split()[-1])


def test_a_zero3_run_loads_in_about_the_memory_of_its_export(benchmark, pretrained):
    peaks = {name: peak_rss_bytes(path) for name, path in pretrained.items()}
    ratios = {name: round(peak / peaks["export"], 3) for name, peak in peaks.items()}
    benchmark.extra_info.update({"device": "cpu", "model": MODEL, "peak_rss_bytes_above_imports": peaks,
                                 "ratio_to_export": ratios})
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\n{MODEL} peak RSS above imports, MiB: " +
          ", ".join(f"{name} {peak / 2**20:.0f} ({ratios[name]}x)" for name, peak in peaks.items()))
    assert peaks["zero3"] < 1.25 * peaks["export"], f"ZeRO-3 run {ratios['zero3']}x the export's peak RSS: {peaks}"
