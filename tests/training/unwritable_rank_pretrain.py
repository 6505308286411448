"""launch/pretrain.py on a rank that cannot write the run folder while the others can: a node-local output_dir
(each node its own disk) that is read-only on one node. Which rank is set by FINECLIP_TEST_UNWRITABLE_RANK."""
import os
import runpy
from pathlib import Path

if os.environ.get("RANK") == os.environ["FINECLIP_TEST_UNWRITABLE_RANK"]:
    real_write_text = Path.write_text

    def read_only_here(path: Path, *args, **kwargs):
        if path.name.startswith(".write_check"):
            raise OSError(30, "Read-only file system", str(path))
        return real_write_text(path, *args, **kwargs)

    Path.write_text = read_only_here
runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
