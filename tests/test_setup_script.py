"""scripts/setup.sh stops at a failed install, with pip's message, and marks nothing as set up."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_failed_pip_install_stops_setup_and_writes_no_stamp(tmp_path):
    for rel in ("scripts/setup.sh", "scripts/check_install.py", "setup.py", "requirements.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    (tmp_path / "csrc").mkdir()
    env = dict(os.environ, TORCH_SPEC="malt-fast-no-such-package==0.0.0", PIP_NO_INDEX="1")
    env.pop("PIP_FIND_LINKS", None)
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "malt-fast-no-such-package" in proc.stderr  # pip's own message
    assert "setup.sh: 'pip install malt-fast-no-such-package==0.0.0' failed" in proc.stderr
    assert not (tmp_path / ".venv" / ".setup-stamp").exists()
