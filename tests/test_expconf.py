"""swallow_ft.expconf: every shipped experiment YAML passes the checks the Determined 0.38 master makes
on `det experiment create`, broken configs get a one-line message that names the key and the fix, and the context
directory it uploads leaves out what the project's commands generate."""
import copy
import re

import pytest
import yaml
from conftest import REPO

from swallow_ft.expconf import SCHEMA_DIR, validate

SHIPPED = sorted((REPO / "experiments").glob("*.yaml")) + [REPO / "swallow_70b_ds3.yaml"]
UPSTREAM = REPO.parent / "shared" / "determined-expconf-schemas"
HP = "hyperparameters.training_arguments.learning_rate"
MESSAGE = re.compile(r"^(\(top level\)|[\w.\[\]-]+): [^\n]+; [^\n]+$")  # "<path>: <what>; <fix>", one line

# A small valid config; every broken case below changes one thing in a copy of it.
BASE = {
    "name": "expconf-test",
    "entrypoint": "python run_clm.py --do_train",
    "resources": {"slots_per_trial": 1},
    "searcher": {"name": "single", "metric": "eval_loss", "max_length": {"batches": 10}},
    "hyperparameters": {"training_arguments": {"learning_rate": 1e-5}},
}
ASHA_038 = {"name": "adaptive_asha", "metric": "eval_loss", "max_trials": 4, "max_time": 100, "time_metric": "batches"}
ASHA_037 = {"name": "adaptive_asha", "metric": "eval_loss", "max_trials": 4, "max_length": {"batches": 100}}


DELETE = object()


def changed(**updates):
    """A copy of BASE with keys set, or removed for the value DELETE; a__b means config["a"]["b"]."""
    config = copy.deepcopy(BASE)
    for key_path, value in updates.items():
        *parents, last = key_path.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last)
        else:
            node[last] = value
    return config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_experiment_configs_are_valid(path):
    config = yaml.safe_load(path.read_text())
    assert validate(config) == []


def test_vendored_schemas_are_the_upstream_files():
    if not UPSTREAM.is_dir():
        pytest.skip("../shared/determined-expconf-schemas is absent: there is nothing to compare the vendored "
                    "swallow_ft/expconf_schemas/*.json with (Determined 0.38.1, schemas/expconf/v0)")
    upstream = {p.name: p.read_bytes() for p in UPSTREAM.glob("*.json")}
    vendored = {p.name: p.read_bytes() for p in SCHEMA_DIR.glob("*.json")}
    assert sorted(vendored) == sorted(upstream)
    assert [name for name in upstream if vendored[name] != upstream[name]] == []


VALID = [
    ("base", BASE, (0, 38)),
    ("asha with max_time on 0.38", changed(searcher=ASHA_038), (0, 38)),
    ("asha with max_length on 0.37", changed(searcher=ASHA_037), (0, 37)),
    ("patch version", changed(searcher=ASHA_038), (0, 38, 1)),
    ("custom searcher on 0.37", changed(searcher={"name": "custom", "metric": "loss"}), (0, 37)),
    # null means "use the default" wherever the schema's type list allows it
    ("nulls", changed(description=None, max_restarts=None, resources=None, environment__image=None), (0, 38)),
    # filled in by the master at submission: the cluster's storage type, other image flavours, a seed
    ("storage without type", changed(checkpoint_storage={"save_trial_best": 2}), (0, 38)),
    ("cuda image only", changed(environment__image={"cuda": "determinedai/genai-train:latest"}), (0, 38)),
    ("no experiment_seed", changed(reproducibility={}), (0, 38)),
    ("storage_path under host_path",
     changed(checkpoint_storage={"type": "shared_fs", "host_path": "/mnt", "storage_path": "/mnt/ckpt"}), (0, 38)),
    ("hyperparameter forms", changed(hyperparameters={
        "lr": {"type": "log", "minval": -5, "maxval": -3, "base": 10},
        "nested": {"opt": {"type": "categorical", "vals": ["adamw", "sgd"]}}, "plain": [1, 2], "text": "3e-3"}),
     (0, 38)),
    ("grid with counts", changed(searcher={"name": "grid", "metric": "loss"},
                                 hyperparameters={"bs": {"type": "int", "minval": 1, "maxval": 8, "count": 4}}),
     (0, 38)),
    ("bind mount", changed(bind_mounts=[{"host_path": "/hf_cache", "container_path": "/hf_cache"}]), (0, 38)),
]


@pytest.mark.parametrize("config, version", [case[1:] for case in VALID], ids=[case[0] for case in VALID])
def test_valid_configs_have_no_messages(config, version):
    assert validate(config, version) == []


BROKEN = [
    ("unknown top-level key", changed(learning_rate=1e-5), (0, 38), "learning_rate", "unknown key"),
    ("top-level key typo", changed(max_restart=3), (0, 38), "max_restart", "did you mean 'max_restarts'"),
    ("slots_per_trial wrong type", changed(resources__slots_per_trial="4"), (0, 38),
     "resources.slots_per_trial", "expected integer or null, got string"),
    ("negative slots", changed(resources__slots_per_trial=-1), (0, 38), "resources.slots_per_trial", "must be >= 0"),
    ("searcher name typo", changed(searcher__name="singel"), (0, 38), "searcher.name", "did you mean 'single'"),
    ("removed searcher", changed(searcher__name="adaptive_simple"), (0, 38),
     "searcher.name", "removed in Determined 0.38"),
    ("custom searcher on 0.38", changed(searcher={"name": "custom", "metric": "loss"}), (0, 38),
     "searcher.name", "removed in Determined 0.38"),
    # The one report of these (swallow_ft/searcher.py leaves them to expconf), so it says what to set them to.
    ("asha without max_time on 0.38", changed(searcher=ASHA_037), (0, 38), "searcher.max_time",
     "is required for adaptive_asha in Determined 0.38 and later; set it to the trial's length in time_metric units: "
     "--max_steps for batches"),
    ("asha without time_metric on 0.38", changed(searcher={**ASHA_038, "time_metric": None}), (0, 38),
     "searcher.time_metric", "set it to batches (with max_time equal to --max_steps) or epochs"),
    ("async_halving without max_time on 0.38",
     changed(searcher={"name": "async_halving", "metric": "loss", "max_trials": 4, "num_rungs": 3}), (0, 38),
     "searcher.max_time", "is required for async_halving"),
    ("asha without max_length on 0.37", changed(searcher=ASHA_038), (0, 37),
     "searcher.max_length", "before Determined 0.38"),
    ("max_trials 0", changed(searcher={"name": "random", "metric": "loss", "max_trials": 0}), (0, 38),
     "searcher.max_trials", "must be >= 1"),
    ("random without max_trials", changed(searcher={"name": "random", "metric": "loss"}), (0, 38),
     "searcher.max_trials", "is required"),
    ("missing searcher.metric", changed(searcher__metric=DELETE), (0, 38), "searcher.metric", "is required"),
    ("missing searcher", changed(searcher=DELETE), (0, 38), "searcher", "is required"),
    ("single with max_trials", changed(searcher__max_trials=2), (0, 38), "searcher.max_trials", "unknown key"),
    ("int minval >= maxval", changed(hyperparameters__training_arguments__learning_rate={
        "type": "int", "minval": 8, "maxval": 8}), (0, 38), f"{HP}.minval", "must be less than maxval"),
    ("log without base", changed(hyperparameters__training_arguments__learning_rate={
        "type": "log", "minval": -5, "maxval": -3}), (0, 38), f"{HP}.base", "is required"),
    ("categorical vals not a list", changed(hyperparameters__training_arguments__learning_rate={
        "type": "categorical", "vals": "1e-5,2e-5"}), (0, 38), f"{HP}.vals", "expected array"),
    ("unknown hyperparameter type", changed(hyperparameters__training_arguments__learning_rate={
        "type": "float", "minval": 0.1, "maxval": 1}), (0, 38), HP, "it must be one of"),
    ("grid without count", changed(searcher={"name": "grid", "metric": "loss"},
                                   hyperparameters={"lr": {"type": "double", "minval": 0.1, "maxval": 1}}),
     (0, 38), "hyperparameters.lr", "count was not provided"),
    ("shared_fs without host_path", changed(checkpoint_storage={"type": "shared_fs"}), (0, 38),
     "checkpoint_storage.host_path", "is required"),
    ("storage type typo", changed(checkpoint_storage={"type": "shared-fs", "host_path": "/mnt"}), (0, 38),
     "checkpoint_storage.type", "did you mean 'shared_fs'"),
    ("storage_path outside host_path",
     changed(checkpoint_storage={"type": "shared_fs", "host_path": "/mnt", "storage_path": "../ckpt"}), (0, 38),
     "checkpoint_storage", "subdirectory of host_path"),
    ("bind mount host_path not absolute", changed(bind_mounts=[{"host_path": "data", "container_path": "/data"}]),
     (0, 38), "bind_mounts[0].host_path", "must be an absolute path"),
    ("environment_variables a string", changed(environment={"environment_variables": "HF_HOME=/hf"}), (0, 38),
     "environment.environment_variables", "expected object or array or null"),
    ("environment_variables not strings", changed(environment={"environment_variables": ["A=1", 2]}), (0, 38),
     "environment.environment_variables", "neither a list of strings nor a map"),
    ("max_length with two units", changed(searcher__max_length={"batches": 10, "epochs": 1}), (0, 38),
     "searcher.max_length", 'one attribute named "batches", "records", or "epochs"'),
    ("max_length of zero", changed(searcher__max_length={"batches": 0}), (0, 38),
     "searcher.max_length.batches", "must be >= 1"),
    ("entrypoint a number", changed(entrypoint=42), (0, 38), "entrypoint", "expected string or array or null"),
    ("checkpoint_policy typo", changed(checkpoint_policy="bset"), (0, 38), "checkpoint_policy", "did you mean 'best'"),
    ("bad shm_size", changed(resources__shm_size="4 gigs"), (0, 38), "resources.shm_size", "valid memory size"),
    ("profiling begin after end", changed(profiling={"begin_on_batch": 10, "end_after_batch": 5}), (0, 38),
     "profiling.begin_on_batch", "at most end_after_batch"),
    ("pod spec sets our image",
     changed(environment={"pod_spec": {"spec": {"containers": [{"name": "determined-container", "image": "x"}]}}}),
     (0, 38), "environment.pod_spec.spec.containers[0].image", "not configurable"),
    ("config not a mapping", None, (0, 38), "(top level)", "expected object, got null"),
]


@pytest.mark.parametrize("config, version, path, expected", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_configs_are_explained(config, version, path, expected):
    messages = validate(config, version)
    assert any(m.startswith(f"{path}: ") and expected in m for m in messages), messages
    assert all(MESSAGE.match(m) for m in messages), messages
    assert len(messages) == len(set(messages))


def _uploaded(context_dir):
    """The files `det experiment create CONFIG context_dir` would send, by Determined's own walk of .detignore."""
    import tarfile

    from determined.common.context import read_v1_context

    return {f.path for f in read_v1_context(context_dir) if f.type == ord(tarfile.REGTYPE)}


def test_generated_files_stay_out_of_the_upload(tmp_path):
    """Whatever the Makefile, the README's commands and the tools' default outputs write into the repository root is
    left out of the context directory; the code, experiments, data and configs are not."""
    readme = (REPO / "README.md").read_text()
    written = {".venv", ".cache", "runs",  # make install / make tiny / local runs
               "checkpoints",  # where export and compare download a checkpoint UUID (checkpoint_files.locate_checkpoint)
               "comparison",  # compare's default --out
               ".ipynb_checkpoints", ".pytest_cache", "tests"}
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))  # not the prose's `--out DIR`
    written |= {out.split("/")[0] for out in re.findall(r"--out (\S+)", commands)}  # exported/, runs/...
    assert "exported" in written  # the README's export commands are still parsed
    (tmp_path / ".detignore").write_bytes((REPO / ".detignore").read_bytes())
    for top in written:
        # export stages next to its target (.NAME.xxxx) before renaming it into place
        for name in ("tiny-swallow-math/model.safetensors", ".tiny-swallow-math.x1/adapter_model.safetensors"):
            (tmp_path / top / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / top / name).write_bytes(b"\0" * 1024)
    kept = {"run_clm.py", "hf_callback.py", "startup-hook.sh", "requirements.txt", "swallow_70b_ds3.yaml",
            "swallow_ft/experiment.py", "swallow_ft/expconf_schemas/experiment.json", "experiments/local_tiny.yaml",
            "ds_configs/ds_config_stage_3.json", "data/chat_ja.jsonl", "scripts/check_image.py",
            "bench/results/h100/random.json", "Finetune_Swallow_70B.ipynb"}
    for name in kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert _uploaded(tmp_path) == kept


def test_what_git_ignores_is_not_uploaded_either():
    """.gitignore lists what is generated; none of it belongs in the upload."""
    def patterns(name):  # anchored (/x/) or not (x/, **/x/): the same entry in the repository root
        lines = (REPO / name).read_text().splitlines()
        return {line.strip().removeprefix("**/").lstrip("/") for line in lines if line.strip()[:1] not in ("", "#")}

    assert patterns(".gitignore") - patterns(".detignore") == set()
