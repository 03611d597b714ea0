"""Record the golden fixtures (run once, before the package layout changed; never rerun over them).

    python tests/golden/make_golden.py            # writes tests/golden/<name>/ for every configuration
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import CONFIGS, RECORDED, commands, make_data  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    from fisherscan.cli import app

    runner = CliRunner()
    for name in CONFIGS:
        target = HERE / name
        if target.exists():
            raise SystemExit(f"{target} exists: the golden fixtures are recorded once and never replaced")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_data(work)
            cwd = os.getcwd()
            os.chdir(work)
            try:
                for args in commands(name):
                    result = runner.invoke(app, args)
                    if result.exit_code != 0:
                        raise SystemExit(f"{name}: {' '.join(args[:1])} failed:\n{result.output}\n{result.exception!r}")
            finally:
                os.chdir(cwd)
            target.mkdir(parents=True)
            for source, dest in RECORDED.items():
                shutil.copyfile(work / source, target / dest)
        info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": 1}
        (target / "recorded_on.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"{name}: {', '.join(sorted(p.name for p in target.iterdir()))}")


if __name__ == "__main__":
    main()
