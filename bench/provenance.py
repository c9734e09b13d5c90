"""Where a results file comes from: the commit benchmarked (shared by the bench scripts, without
the side effects of importing bench_step, which switches Triton's interpreter off)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

REPO = Path(__file__).resolve().parent.parent


def git_info(override: Optional[str]) -> Dict[str, object]:
    """The commit benchmarked. The GPU machine gets a copy of the working tree without .git, so
    ``--commit`` (or BENCH_COMMIT) passes the commit from where the run was launched."""
    override = override or os.environ.get("BENCH_COMMIT")
    if override:
        return dict(commit=override, dirty=override.endswith("-dirty"), source="--commit/BENCH_COMMIT")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=20)
        if commit.returncode == 0:
            return dict(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()), source="git")
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(commit=None, dirty=None, source="unknown (no git checkout here; pass --commit)")


def versions() -> Dict[str, Optional[str]]:
    """torch, its CUDA and Triton versions (None where absent: a CPU build has no CUDA, maybe no
    Triton). Triton is imported here, so call this after any TRITON_INTERPRET switch."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: report it as such
        triton_version = None
    return dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version)
