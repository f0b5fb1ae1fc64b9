"""Run by startup-hook.sh before anything is installed: does this container image fit the pinned stack?

transformers 5.24 needs Python >= 3.11 and turns PyTorch off below 2.6, so on an older image the job would
fail late and obscurely: a pip resolver error, or a model class that "requires the PyTorch library".
torch is not pinned in requirements.txt because its CUDA build must match the image's driver and CUDA.
"""
import re
import sys
from importlib import metadata
from typing import List, Optional

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 6)
FIX = "set environment.image in the experiment YAML to an image with Python >= 3.11 and a CUDA build of torch >= 2.6"


def version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def problems(python: tuple, torch_version: Optional[str]) -> List[str]:
    found = []
    if python[:2] < MIN_PYTHON:
        found.append(f"this image has Python {'.'.join(map(str, python[:3]))}; transformers 5.24 needs "
                     f"Python >= {'.'.join(map(str, MIN_PYTHON))}")
    if torch_version is None:
        found.append("this image has no torch")
    elif version_tuple(torch_version) < MIN_TORCH:
        found.append(f"this image has torch {torch_version}; transformers 5.24 needs torch >= "
                     f"{'.'.join(map(str, MIN_TORCH))}")
    return found


def installed_torch() -> Optional[str]:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    found = problems(tuple(sys.version_info), installed_torch())
    for problem in found:
        print(f"startup-hook.sh: {problem}: {FIX}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
