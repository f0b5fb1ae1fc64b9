"""The planner: what it picks for Swallow sizes, why, and that the shipped YAMLs carry its choices."""

import shutil

import pytest

from conftest import REPO
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment
from swallow_ft.memory import KNOWN_SHAPES, estimate, fits
from swallow_ft.plan import flags_for, plan, write_into
from swallow_ft.preflight import check_experiment


def test_70b_on_four_80gb_gpus_shards_with_zero3_and_hides_the_all_gather():
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=4, gpu_mem=80, seq=2048, lora=True, global_batch=32, gpu="a100")
    assert chosen.setting.zero_stage == 3 and fits(chosen.estimate, 80)
    assert chosen.compute_s >= chosen.gather_s  # the micro-batch is large enough for compute to hide the gathers
    assert chosen.setting.micro_batch > 1
    assert any("all-gather the weights twice" in r for r in chosen.reasons)
    assert "--use_liger_kernel" not in flags_for(chosen, 2048)  # the fused loss reads lm_head, which ZeRO-3 shards


@pytest.mark.parametrize("gpu", ["h100", "a100"])
@pytest.mark.parametrize("global_batch", [32, 64, 128])
def test_70b_on_four_80gb_gpus_never_offloads(gpu, global_batch):
    """ZeRO-3 alone fits 4 x 80 GB, so offload (pinned host memory, PCIe before every forward and backward) is not
    needed; the planner used to pick it at global batch 64 for the larger micro-batch it allows."""
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=4, gpu_mem=80, seq=2048, lora=True, global_batch=global_batch,
                  gpu=gpu)
    assert chosen.setting.zero_stage == 3 and not chosen.setting.offload and chosen.pcie_s == 0
    assert "offload" not in " ".join(flags_for(chosen, 2048))


def test_offload_only_when_nothing_fits_without_it():
    shape = KNOWN_SHAPES["swallow-70b"]
    for gpus, gpu_mem in ((2, 48), (2, 80), (4, 40), (4, 48), (8, 24), (8, 40)):
        chosen = plan(shape, gpus=gpus, gpu_mem=gpu_mem, seq=2048, lora=True, global_batch=64)
        smallest_on_gpu = estimate(shape, gpus=gpus, zero_stage=3, micro_batch=1, seq_len=2048, lora_r=16,
                                   gradient_checkpointing=True)
        assert chosen.setting.offload is not fits(smallest_on_gpu, gpu_mem), (gpus, gpu_mem)
    chosen = plan(shape, gpus=2, gpu_mem=48, seq=2048, lora=True, global_batch=64)
    assert chosen.setting.offload and chosen.pcie_s > 0
    (reason,) = [r for r in chosen.reasons if r.startswith("CPU offload")]
    assert "nothing fits the GPUs without it" in reason and "cross PCIe" in reason and "64 GiB per GPU" in reason
    assert "ds_configs/ds_config_stage_3_offload.json" in flags_for(chosen, 2048)


@pytest.mark.parametrize("shape, gpus", [("swallow-7b", 1), ("swallow-13b", 2)])
def test_models_that_fit_one_gpu_get_no_zero3(shape, gpus):
    chosen = plan(KNOWN_SHAPES[shape], gpus=gpus, gpu_mem=80, seq=2048, lora=True, global_batch=32)
    assert chosen.setting.zero_stage == 0 and not chosen.setting.offload
    assert "--deepspeed" not in flags_for(chosen, 2048) and "--use_liger_kernel" in flags_for(chosen, 2048)
    assert any(r.startswith("no ZeRO-3") for r in chosen.reasons)
    assert any(r.startswith("Liger Kernel on") and "bench/RESULTS.md" in r for r in chosen.reasons)


def test_full_fine_tuning_shards_optimizer_state():
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=4, gpu_mem=80, seq=2048, lora=False, global_batch=32)
    assert chosen.setting.zero_stage in (2, 3) and fits(chosen.estimate, 80)


def test_nothing_fits_says_so():
    with pytest.raises(UserError, match="nothing fits 1 x 2 GiB .* add GPUs"):
        plan(KNOWN_SHAPES["swallow-70b"], gpus=1, gpu_mem=2, seq=4096, lora=True, global_batch=32)


@pytest.mark.parametrize("path, shape, gpus", [("swallow_70b_ds3.yaml", "swallow-70b", 4),
                                               ("experiments/swallow_13b.yaml", "swallow-13b", 2),
                                               ("experiments/swallow_7b.yaml", "swallow-7b", 1)])
def test_shipped_experiments_carry_the_planners_choice(path, shape, gpus):
    chosen = plan(KNOWN_SHAPES[shape], gpus=gpus, gpu_mem=80, seq=2048, lora=True, global_batch=32, gpu="a100")
    args = " ".join(Experiment.load(REPO / path).script_args())
    for i, flag in enumerate(flags := flags_for(chosen, 2048)):
        if flag.startswith("--"):
            value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
            assert (f"{flag} {value}" if value else flag) in args, flag


def test_write_into_replaces_the_planned_flags_and_keeps_the_rest(tmp_path):
    path = tmp_path / "exp.yaml"
    shutil.copy(REPO / "swallow_70b_ds3.yaml", path)
    (tmp_path / "ds_configs").mkdir()
    shutil.copy(REPO / "ds_configs/ds_config_stage_3.json", tmp_path / "ds_configs")
    before = Experiment.load(path)
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=8, gpu_mem=80, seq=2048, lora=True, global_batch=64, gpu="h100")
    write_into(path, chosen, 2048, gpus=8)
    after = Experiment.load(path)
    args = after.script_args()
    assert after.slots_per_trial == 8 and after.uses_deepspeed_launcher()
    assert args.count("--per_device_train_batch_size") == 1 and args.count("--deepspeed") == 1
    assert args[args.index("--per_device_train_batch_size") + 1] == str(chosen.setting.micro_batch)
    assert "--model_name_or_path" in args and "# Changes from the reference" in path.read_text()
    assert after.config["searcher"] == before.config["searcher"]
    assert check_experiment(path).problems == []


@pytest.mark.parametrize("gpus, gpu_mem, config", [(2, 48, "ds_configs/ds_config_stage_3_offload.json"),
                                                   (8, 80, "ds_configs/ds_config_stage_3.json")])
def test_write_into_keeps_the_deepspeed_hyperparameter_in_step(tmp_path, gpus, gpu_mem, config):
    """The reference names its DeepSpeed config twice; DSAT tunes the hyperparameter's file."""
    path = tmp_path / "exp.yaml"
    shutil.copy(REPO / "swallow_70b_ds3.yaml", path)
    shutil.copytree(REPO / "ds_configs", tmp_path / "ds_configs")
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=gpus, gpu_mem=gpu_mem, seq=2048, lora=True, global_batch=64)
    write_into(path, chosen, 2048, gpus=gpus)
    after = Experiment.load(path)
    args = after.script_args()
    assert args[args.index("--deepspeed") + 1] == config
    assert after.config["hyperparameters"]["deepspeed_config"] == config
    assert check_experiment(path, gpu_mem=gpu_mem).problems == []


def test_write_into_drops_the_deepspeed_hyperparameter_when_the_plan_needs_no_deepspeed(tmp_path):
    path = tmp_path / "exp.yaml"
    shutil.copy(REPO / "swallow_70b_ds3.yaml", path)
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=80, seq=2048, lora=True, global_batch=64)
    write_into(path, chosen, 2048, gpus=1)
    after = Experiment.load(path)
    assert "--deepspeed" not in after.script_args() and "deepspeed_config" not in after.config["hyperparameters"]
    assert after.config["hyperparameters"]["training_arguments"] == {"learning_rate": "1e-5"}  # the rest stays
