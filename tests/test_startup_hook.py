"""startup-hook.sh in a trial container: the image is checked before anything is installed, and the pins hold."""

import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_image  # noqa: E402


@pytest.mark.parametrize("python, torch, expected", [
    ((3, 11, 4), "2.6.0+cu124", []),
    ((3, 12, 3), "2.11.0+cu130", []),
    ((3, 10, 12), "2.6.0", ["this image has Python 3.10.12; transformers 5.24 needs Python >= 3.11"]),
    ((3, 11, 0), "2.5.1+cu121", ["this image has torch 2.5.1+cu121; transformers 5.24 needs torch >= 2.6"]),
    ((3, 11, 0), None, ["this image has no torch"]),
])
def test_image_problems_name_what_to_change(python, torch, expected):
    assert check_image.problems(python, torch) == expected


def test_the_check_runs_as_the_hook_runs_it_and_passes_here():
    result = subprocess.run([sys.executable, "scripts/check_image.py"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""


# Determined's trial entrypoint sources the hook into its own `set -e` shell, then waits for the trial and tests a
# variable it has unset. `python3` is a shell function here that logs its arguments (and fails where told to): the
# real check and the real pip install are not what this test is about.
SOURCING_SHELL = """
set -e
python3() { echo "$*" >> calls; [ "$1" != "$FAIL" ]; }
before="$(set +o; shopt -p)"
source ./startup-hook.sh
[ "$(set +o; shopt -p)" = "$before" ] || { echo "the hook changed the shell's options"; exit 3; }
unset trapped_signal
[ -z "${trapped_signal}" ]
sleep 0 & wait $!
echo "trial ran"
"""


@pytest.mark.parametrize("fail, calls, exit_code", [
    ("", ["scripts/check_image.py", "-m pip install --no-cache-dir --quiet -r requirements.txt"], 0),
    ("scripts/check_image.py", ["scripts/check_image.py"], 1),
    ("-m", ["scripts/check_image.py", "-m pip install --no-cache-dir --quiet -r requirements.txt"], 1),
])
def test_sourced_by_the_entrypoint_the_hook_leaves_its_shell_as_it_was(tmp_path, fail, calls, exit_code):
    (tmp_path / "startup-hook.sh").write_text((REPO / "startup-hook.sh").read_text())
    result = subprocess.run(["bash", "-c", SOURCING_SHELL], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "FAIL": fail})
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == calls
    assert ("trial ran" in result.stdout) is (exit_code == 0)


def test_requirements_pin_what_this_machine_runs():
    """The trial's pins are the ones the tests ran with (deepspeed's 0.19.8 carries the ZeRO-3 checkpointing fix)."""
    from packaging.requirements import Requirement

    lines = (REPO / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in requirements)
    pins = {r.name: next(iter(r.specifier)).version for r in requirements if r.marker is None or r.marker.evaluate()}
    assert pins["deepspeed"] == "0.19.8"
    assert all(metadata.version(name) == version for name, version in pins.items())


def test_liger_is_left_out_only_where_triton_has_no_wheels():
    """Liger needs Triton, which has Linux wheels only: a Mac must still install requirements.txt (make demo)."""
    from packaging.requirements import Requirement

    (liger,) = [Requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.startswith("liger-kernel")]
    assert liger.marker.evaluate({"sys_platform": "linux"}) and not liger.marker.evaluate({"sys_platform": "darwin"})
