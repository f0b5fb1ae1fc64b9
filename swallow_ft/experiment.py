"""Read a Determined experiment YAML for a local run: entrypoint flags, hyperparameters, storage.

On a cluster the master does this: it samples the hyperparameters and runs the entrypoint. Locally we
take the same file and do the parts a single trial needs, so one YAML serves both modes.
"""

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from swallow_ft.errors import UserError

SEARCHED_TYPES = ("int", "double", "log", "categorical")
SCRIPT_NAME = "run_clm.py"


@dataclass
class Experiment:
    path: Path
    config: Dict[str, Any]

    @classmethod
    def load(cls, path) -> "Experiment":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: experiment file not found")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(config, dict):
            raise UserError(f"{path}: expected a mapping of experiment settings at the top level")
        return cls(path, config)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.stem)

    @property
    def slots_per_trial(self) -> int:
        slots = (self.config.get("resources") or {}).get("slots_per_trial", 1)
        if not isinstance(slots, int) or slots < 1:
            raise UserError(f"{self.path}: resources.slots_per_trial must be a positive integer, got {slots!r}")
        return slots

    @property
    def searcher(self) -> Dict[str, Any]:
        return self.config.get("searcher") or {}

    def entrypoint_tokens(self) -> List[str]:
        entrypoint = self.config.get("entrypoint")
        if isinstance(entrypoint, str):
            return shlex.split(entrypoint)
        if isinstance(entrypoint, list) and all(isinstance(t, str) for t in entrypoint):
            return list(entrypoint)
        raise UserError(f"{self.path}: entrypoint must be a string or a list of strings, e.g. "
                        f"'python -m determined.launch.deepspeed python {SCRIPT_NAME} --model_name_or_path ...'")

    def script_args(self) -> List[str]:
        """The flags after run_clm.py in the entrypoint."""
        tokens = self.entrypoint_tokens()
        for i, token in enumerate(tokens):
            if Path(token).name == SCRIPT_NAME:
                return tokens[i + 1:]
        raise UserError(f"{self.path}: entrypoint does not run {SCRIPT_NAME}: {' '.join(tokens)}")

    def flags(self, overrides: Sequence[str]) -> List[str]:
        """What a local trial passes to run_clm.py: entrypoint flags, then training_arguments."""
        from swallow_ft.arguments import dict2args, split_equals

        hparams = self.hparams_for_local_run(overrides)
        return split_equals(self.script_args()) + dict2args(hparams.get("training_arguments") or {})

    def uses_deepspeed_launcher(self) -> bool:
        return "determined.launch.deepspeed" in self.entrypoint_tokens()

    def hparams_for_local_run(self, overrides: Sequence[str]) -> Dict[str, Any]:
        """The hyperparameters a single local trial gets, as the master would hand them to a trial.

        Constants are unwrapped. A searched hyperparameter has no single value, so unless the user
        pins it with a flag on the command line it is an error that names that flag.
        """
        flags_given = {arg.split("=")[0] for arg in overrides if arg.startswith("--")}
        return {key: self._resolve(key, value, flags_given)
                for key, value in (self.config.get("hyperparameters") or {}).items()}

    def sample_hparams(self) -> Dict[str, Any]:
        """Hyperparameters as one trial of the search could get them (each range's lower end)."""
        return {key: self._resolve(key, value, set(), sample=True)
                for key, value in (self.config.get("hyperparameters") or {}).items()}

    def _resolve(self, key: str, value: Any, flags_given: set, prefix: str = "", sample: bool = False) -> Any:
        dotted = f"{prefix}{key}"
        if not isinstance(value, dict):
            return value
        kind = value.get("type")
        if kind == "const":
            return value.get("val")
        if sample and kind in SEARCHED_TYPES:
            if kind == "categorical":
                return (value.get("vals") or [None])[0]
            return value.get("base", 10) ** value.get("minval", 0) if kind == "log" else value.get("minval")
        if kind in SEARCHED_TYPES:
            flag = f"--{key}"
            if prefix == "training_arguments." and flag in flags_given:
                return None  # the command-line override is appended after it and wins
            hint = (f"pass {flag} VALUE after --config to fix it for this run" if prefix == "training_arguments."
                    else "give it a constant value for local runs")
            raise UserError(f"{self.path}: hyperparameters.{dotted} is searched (type: {kind}) and a local run "
                            f"trains one trial: {hint}")
        if kind is None:  # a nested mapping of hyperparameters
            resolved = {k: self._resolve(k, v, flags_given, prefix=f"{dotted}.", sample=sample)
                        for k, v in value.items()}
            return {k: v for k, v in resolved.items() if v is not None}
        raise UserError(f"{self.path}: hyperparameters.{dotted} has unknown type {kind!r} "
                        f"(use const, int, double, log or categorical)")

    def local_checkpoint_dir(self, runs_dir: Path) -> Path:
        """Where a local run stores checkpoints: the YAML's storage when it is a local path."""
        storage = self.config.get("checkpoint_storage") or {}
        kind = storage.get("type")
        if kind == "shared_fs" and storage.get("host_path"):
            base = Path(storage["host_path"])
            return base / storage["storage_path"] if storage.get("storage_path") else base
        if kind == "directory" and storage.get("container_path"):
            return Path(storage["container_path"])
        return runs_dir / self.name / "checkpoints"

    def cluster_only_storage(self) -> Optional[str]:
        kind = (self.config.get("checkpoint_storage") or {}).get("type")
        return kind if kind in ("s3", "gcs", "azure") else None
