"""Importing the library is cheap: no Ray, DeepSpeed or transformers behind `pipeline`, its losses or config."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_core_modules_import_without_heavy_dependencies():
    code = (
        "import sys, pipeline, pipeline.losses, pipeline.tokenstats, pipeline.config, pipeline.errors\n"
        "heavy = [m for m in ('ray', 'deepspeed', 'transformers', 'datasets', 'mlflow') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
