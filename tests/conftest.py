import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_model():
    """The real tiny Swallow, built once (and cached in .cache/ like `make tiny` does)."""
    from swallow_ft.tiny import build

    return build()


def run_clm(*args, timeout=600, env=None):
    """Run run_clm.py as a user would, from the repo root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "run_clm.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def checkpoint_steps(storage_dir):
    """{storage_id: steps_completed} for every finished checkpoint in a storage dir."""
    return {meta.parent.name: json.loads(meta.read_text())["steps_completed"]
            for meta in Path(storage_dir).glob("*/metadata.json")}


def registered_steps(run_dir):
    """{storage_id: steps_completed} for the checkpoints a local run registered (as the master would)."""
    return {r["storage_id"]: r["steps_completed"] for r in read_metrics(Path(run_dir) / "checkpoints.jsonl")} \
        if (Path(run_dir) / "checkpoints.jsonl").exists() else {}
