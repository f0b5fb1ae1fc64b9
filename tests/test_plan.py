"""The planner: what it picks for Swallow sizes, why, and that the shipped YAMLs carry its choices."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment
from swallow_ft.memory import KNOWN_SHAPES, GiB, estimate, fits
from swallow_ft.gpus import gpu_gib
from swallow_ft.plan import flags_for, main, plan
from swallow_ft.plan_yaml import PLANNED, write_into
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
    assert "nothing fits the GPUs without it" in reason and "cross PCIe" in reason
    assert any(r.startswith("host RAM: offload keeps 132 GiB in pinned CPU memory, 66 GiB per GPU (16-bit weights 129 "
                            "GiB,") for r in chosen.reasons)
    assert "ds_configs/ds_config_stage_3_offload.json" in flags_for(chosen, 2048)


def test_one_gpu_gets_zero3_for_offload_not_for_sharding_and_is_told_the_host_ram():
    """70B on one T4 said the weights were `sharded 1 ways`, gave a 0 ms all-gather, and planned 129 GiB of weights
    into host memory without saying how much host memory that takes."""
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=1, gpu_mem=gpu_gib(None, "t4")[0], seq=2048, lora=True,
                  global_batch=64, gpu="t4")
    assert chosen.setting.zero_stage == 3 and chosen.setting.offload
    assert chosen.reasons[:4] == [
        "ZeRO-3 on one GPU: the 16-bit weights (129 GiB) do not fit beside the rest on the 14.5 GiB GPU, and ZeRO-3 "
        "lets offload move parameters to the CPU",
        "activation checkpointing: without it the activations of this micro-batch do not fit",
        "CPU offload: nothing fits the GPU without it. The weights cross PCIe before every forward and backward "
        "(13832 ms per micro-step, vs 58609 ms of compute: compute hides them)",
        "host RAM: offload keeps 132 GiB in pinned CPU memory (16-bit weights 129 GiB, optimizer state and fp32 "
        "gradients 3.1 GiB); DeepSpeed's estimate_zero3_model_states_mem_needs multiplies that by 1.5 for buffers: "
        "give the host 198 GiB free"]
    assert not any("ways" in r or "all-gather" in r for r in chosen.reasons)


@pytest.mark.parametrize("gpus, gpu_mem", [(1, 24), (4, 8)])
def test_the_host_ram_of_full_fine_tuning_offload_is_deepspeeds_estimate(gpus, gpu_mem):
    """The memory model's offloaded weights, optimizer state and fp32 gradients are DeepSpeed's 18 bytes per parameter
    (estimate_zero3_model_states_mem_needs under zero.Init, which the runs use), before its buffer factor."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from swallow_ft.plan import offloaded_bytes

    shape = KNOWN_SHAPES["swallow-7b"]
    chosen = plan(shape, gpus=gpus, gpu_mem=gpu_mem, seq=2048, lora=False, global_batch=64)
    assert chosen.setting.offload
    deepspeed = [estimate_zero3_model_states_mem_needs(shape.total_params, shape.largest_layer_params, gpus,
                                                       zero_init=True, additional_buffer_factor=factor)[0]
                 for factor in (1.0, 1.5)]
    assert sum(offloaded_bytes(shape, chosen.setting, gpus, None)) == pytest.approx(deepspeed[0], abs=8)
    (reason,) = [r for r in chosen.reasons if r.startswith("host RAM")]
    assert reason.endswith(f"give the host {deepspeed[1] / GiB:.0f} GiB free")


def test_write_leaves_a_file_that_already_has_the_plan_as_it_is(tmp_path, capsys):
    """A second --write said `wrote them into` again, rewriting a file whose text it did not change."""
    path = tmp_path / "swallow_70b_ds3.yaml"
    shutil.copy(REPO / "swallow_70b_ds3.yaml", path)
    shutil.copytree(REPO / "ds_configs", tmp_path / "ds_configs")
    for gpus in ("8", "4"):
        args = ["--model", "swallow-70b", "--gpus", gpus, "--gpu-mem", "80", "--gpu", "a100", "--global-batch", "32",
                "--write", str(path)]
        assert main(args) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"  wrote them into {path}"
        os.utime(path, (0, 0))
        text = path.read_text()
        assert main(args) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"  {path} already has them (unchanged)"
        assert path.stat().st_mtime == 0 and path.read_text() == text


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
    write_into(path, flags_for(chosen, 2048), gpus=8)
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
    write_into(path, flags_for(chosen, 2048), gpus=gpus)
    after = Experiment.load(path)
    args = after.script_args()
    assert args[args.index("--deepspeed") + 1] == config
    assert after.config["hyperparameters"]["deepspeed_config"] == config
    assert check_experiment(path, gpu_mem=gpu_mem).problems == []


def test_write_into_drops_the_deepspeed_hyperparameter_when_the_plan_needs_no_deepspeed(tmp_path):
    path = tmp_path / "exp.yaml"
    shutil.copy(REPO / "swallow_70b_ds3.yaml", path)
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=80, seq=2048, lora=True, global_batch=64)
    write_into(path, flags_for(chosen, 2048), gpus=1)
    after = Experiment.load(path)
    assert "--deepspeed" not in after.script_args() and "deepspeed_config" not in after.config["hyperparameters"]
    assert after.config["hyperparameters"]["training_arguments"] == {"learning_rate": "1e-4"}  # the rest stays


@pytest.mark.parametrize("gpus", [4, 8])
def test_llama_3_70b_counts_its_128k_vocabulary_loss(gpus):
    """transformers' loss keeps 12 bytes per logit as backward starts: 23.5 GiB at 8 x 2048 tokens for a 128,256
    vocabulary. The planner used to put micro-batch 8 on 4 x 80 GB (71.2 GiB by the old count, 86.9 by the new)."""
    shape = KNOWN_SHAPES["llama-3-swallow-70b"]
    chosen = plan(shape, gpus=gpus, gpu_mem=80, seq=2048, lora=True, global_batch=64)
    s = chosen.setting
    assert fits(chosen.estimate, 80)
    bigger = estimate(shape, gpus=gpus, zero_stage=s.zero_stage, micro_batch=2 * s.micro_batch, seq_len=2048,
                      lora_r=16, gradient_checkpointing=s.checkpointing)
    assert not fits(bigger, 80) or s.micro_batch * gpus * 2 > 64  # the next micro-batch does not fit, or overshoots
    assert (s.zero_stage, s.micro_batch, chosen.accumulation) == ((3, 4, 4) if gpus == 4 else (3, 8, 1))


def test_without_zero3_the_plan_counts_ligers_fused_loss():
    shape = KNOWN_SHAPES["llama-3-swallow-8b"]
    chosen = plan(shape, gpus=1, gpu_mem=80, seq=2048, lora=True, global_batch=64)
    assert "--use_liger_kernel" in flags_for(chosen, 2048)
    s = chosen.setting
    assert chosen.estimate == estimate(shape, gpus=1, zero_stage=s.zero_stage, micro_batch=s.micro_batch, seq_len=2048,
                                       lora_r=16, gradient_checkpointing=s.checkpointing, fused_loss=True)


def test_an_exact_global_batch_is_kept_with_a_micro_batch_that_is_no_power_of_two():
    """48 sequences on 8 GPUs used to become micro-batch 4 x accumulation 2 = 64, quietly."""
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=8, gpu_mem=80, seq=2048, lora=True, global_batch=48)
    assert (chosen.setting.micro_batch, chosen.accumulation, chosen.global_batch) == (6, 1, 48)
    assert "gradient accumulation 1 for a global batch of 48 sequences (micro-batch 6 x 8 GPU(s) x accumulation 1)" \
        in chosen.reasons


@pytest.mark.parametrize("gpus, asked, planned, why", [
    (8, 50, 64, "50 is not a multiple of the 8 GPUs; ask for a multiple of 8 to get it exactly"),
    (4, 44, 64, "the fastest setting that gives 44 (micro-batch 1, accumulation 11) is 54% slower by the time model; "
                "set those flags to keep 44"),
])
def test_a_changed_global_batch_is_said_with_the_reason(gpus, asked, planned, why):
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=gpus, gpu_mem=80, seq=2048, lora=True, global_batch=asked)
    s = chosen.setting
    assert chosen.global_batch == planned == s.micro_batch * gpus * chosen.accumulation
    assert (f"global batch {planned}, not the {asked} asked (micro-batch {s.micro_batch} x {gpus} GPU(s) x "
            f"accumulation {chosen.accumulation}): {why}") in chosen.reasons


def test_an_exact_batch_wins_when_about_as_fast(monkeypatch):
    """7 sequences on one GPU: micro-batch 1 x 7 is 8% slower by the time model than micro-batch 4 x 2 = 8, within
    EXACT_BATCH_SLACK (10%, less than the model's own error)."""
    from swallow_ft import plan as planner

    args = dict(gpus=1, gpu_mem=80, seq=2048, lora=True, global_batch=7)
    exact = plan(KNOWN_SHAPES["swallow-7b"], **args)
    assert (exact.setting.micro_batch, exact.accumulation, exact.global_batch) == (1, 7, 7)
    monkeypatch.setattr(planner, "EXACT_BATCH_SLACK", 0.0)
    fastest = plan(KNOWN_SHAPES["swallow-7b"], **args)
    assert (fastest.setting.micro_batch, fastest.accumulation, fastest.global_batch) == (4, 2, 8)
    assert 1 - exact.tokens_per_second_per_gpu / fastest.tokens_per_second_per_gpu == pytest.approx(0.083, abs=0.001)


def test_rows_longer_than_the_model_knows_are_refused():
    with pytest.raises(UserError, match=r"^--seq 8192: 8192 tokens exceed the model's max_position_embeddings "
                                        r"\(4096\) and its config has no rope_scaling: use --seq 4096 or less$"):
        plan(KNOWN_SHAPES["swallow-70b"], gpus=8, gpu_mem=80, seq=8192, lora=True, global_batch=64)


def test_cli_says_a_mistyped_model_in_one_line(capsys):
    from swallow_ft.plan import main

    assert main(["--model", "tokyotech-llm/Swallow-70b-instrct-v0.1", "--gpus", "4", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model tokyotech-llm/Swallow-70b-instrct-v0.1 is not a known Swallow model id")
    assert err.count("\n") == 1


def test_a_gpu_without_bf16_gets_fp16_configs_and_no_liger():
    for gpus, gpu_mem, offload in ((4, 80, False), (2, 32, True)):
        chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=gpus, gpu_mem=gpu_mem, seq=2048, lora=True, global_batch=64,
                      gpu="v100")
        flags = flags_for(chosen, 2048)
        config = flags[flags.index("--deepspeed") + 1]
        assert "--fp16" in flags and "--bf16" not in flags and "--use_liger_kernel" not in flags
        assert config.endswith("_fp16.json") and (REPO / config).is_file() and chosen.setting.offload is offload
        assert json.loads((REPO / config).read_text())["fp16"]["enabled"] == "auto"
        assert any("this GPU has no bf16" in r for r in chosen.reasons)
    single = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=32, seq=2048, lora=True, global_batch=64, gpu="v100")
    assert "--fp16" in flags_for(single, 2048) and single.setting.zero_stage == 0


def test_write_into_keeps_environment_variables_as_written(tmp_path, monkeypatch):
    """The entrypoint is expanded for a local run; rewriting the file must not bake this machine's $HOME into it."""
    monkeypatch.setenv("HOME", "/home/planner")
    path = tmp_path / "exp.yaml"
    text = (REPO / "experiments/swallow_7b.yaml").read_text()
    path.write_text(text.replace("python3 run_clm.py\n", "python3 run_clm.py\n  --cache_dir $HOME/hf_cache\n", 1))
    assert Experiment.load(path).script_args()[:2] == ["--cache_dir", "/home/planner/hf_cache"]
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=80, seq=2048, lora=True, global_batch=64)
    write_into(path, flags_for(chosen, 2048), gpus=1)
    assert '--cache_dir "$HOME"/hf_cache' in path.read_text() and "/home/planner" not in path.read_text()


def test_an_unknown_gpu_is_refused_not_planned_with_h100_speeds(capsys):
    from swallow_ft.plan import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "swallow-70b", "--gpus", "4", "--gpu-mem", "80", "--gpu", "a100x"])
    assert exit_info.value.code == 2
    assert "argument --gpu: invalid choice: 'a100x' (choose from 'h200', 'h100', 'a100'" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"^--gpu a100x: unknown GPU: use one of h200, h100, a100, "):
        plan(KNOWN_SHAPES["swallow-70b"], gpus=4, gpu_mem=80, seq=2048, lora=True, global_batch=32, gpu="a100x")
    assert main(["--model", "swallow-70b", "--gpus", "4", "--gpu-mem", "80", "--gpu", "A100"]) == 0
    assert "on 4 x 79.1 GiB (a100, what torch.cuda reports for 80 GB):" in capsys.readouterr().out


def _experiment_training(tmp_path, model: str):
    path = tmp_path / "exp.yaml"
    text = (REPO / "experiments/swallow_7b.yaml").read_text()
    path.write_text(text.replace("--model_name_or_path tokyotech-llm/Swallow-7b-instruct-v0.1",
                                 f"--model_name_or_path {model}", 1))
    return path


@pytest.mark.parametrize("trains, why", [
    ("tokyotech-llm/Swallow-70b-instruct-v0.1", "(another shape)"),
    ("tokyotech-llm/Swallow-7b-NVE-hf", "(another shape)"),  # Llama-2's 32000-token vocabulary, not 43176
    ("TINY", "(another shape)"),
    ("/nonexistent/model", "whose config is not available offline"),
])
def test_write_refuses_an_experiment_that_trains_another_model(tmp_path, capsys, trains, why):
    from swallow_ft.plan import main

    if trains == "TINY":
        trains = str(tmp_path / "tiny")
        (tmp_path / "tiny").mkdir()
        (tmp_path / "tiny/config.json").write_text(json.dumps(
            {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 43176, "max_position_embeddings": 4096}))
    path = _experiment_training(tmp_path, trains)
    before = path.read_text()
    assert main(["--model", "swallow-7b", "--gpus", "1", "--gpu-mem", "80", "--write", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --write {path}: the YAML trains {trains}") and why in captured.err
    assert f"pass --model {trains}, or edit --model_name_or_path in {path}" in captured.err
    assert captured.err.count("\n") == 1 and captured.out == "" and path.read_text() == before


def test_write_takes_a_short_name_for_the_model_the_experiment_trains(tmp_path, capsys):
    from swallow_ft.plan import main

    path = _experiment_training(tmp_path, "tokyotech-llm/Swallow-7b-instruct-v0.1")
    assert main(["--model", "swallow-7b", "--gpus", "2", "--gpu-mem", "80", "--write", str(path)]) == 0
    assert f"wrote them into {path}" in capsys.readouterr().out and Experiment.load(path).slots_per_trial == 2


def test_write_compares_with_the_model_run_clm_would_train(tmp_path, capsys):
    """A repeated flag is taken at its last occurrence, as argparse takes it: the check compared the first."""
    from swallow_ft.plan import main

    path = _experiment_training(tmp_path, "tokyotech-llm/Swallow-70b-instruct-v0.1 "
                                          "--model_name_or_path tokyotech-llm/Swallow-7b-instruct-v0.1")
    assert main(["--model", "swallow-7b", "--gpus", "2", "--gpu-mem", "80", "--write", str(path)]) == 0
    assert f"wrote them into {path}" in capsys.readouterr().out
    path = _experiment_training(tmp_path, "tokyotech-llm/Swallow-7b-instruct-v0.1 "
                                          "--model_name_or_path=tokyotech-llm/Swallow-70b-instruct-v0.1")
    assert main(["--model", "swallow-7b", "--gpus", "2", "--gpu-mem", "80", "--write", str(path)]) == 2
    assert "the YAML trains tokyotech-llm/Swallow-70b-instruct-v0.1" in capsys.readouterr().err


@pytest.mark.parametrize("model, says", [
    ("swallow-70", "error: --model swallow-70 is not a known short name or Swallow Hub id (did you mean swallow-70b"),
    ("someone/not-a-model", "cache its config (hf download someone/not-a-model config.json)"),
])
def test_cli_suggests_what_fits_the_kind_of_name(capsys, model, says):
    from swallow_ft.plan import main

    assert main(["--model", model, "--gpus", "4", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    if "/" not in model:  # a short name is no Hub id: neither a Hub id to suggest nor one to download
        assert "hf download" not in err and "tokyotech-llm/" not in err


def _unplanned(args):
    """The words of script_args() that the plan does not set (the planned flags and their values left out)."""
    out, skip = [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in PLANNED:
            skip = PLANNED[arg]
        else:
            out.append(arg)
    return out


def _with_entrypoint_lines(tmp_path, lines: str):
    """A copy of experiments/swallow_7b.yaml whose entrypoint starts with these lines."""
    path = tmp_path / "exp.yaml"
    shutil.copytree(REPO / "ds_configs", tmp_path / "ds_configs")
    text = (REPO / "experiments/swallow_7b.yaml").read_text()
    path.write_text(text.replace("python3 run_clm.py\n", "python3 run_clm.py\n" + lines, 1))
    return path


def test_write_into_gives_back_every_word_the_shell_gave(tmp_path, monkeypatch):
    """The cluster runs the entrypoint with sh: a JSON value or a sentence written back unquoted became several
    words (the preflight then failed: `invalid training flags: Expecting property name`)."""
    monkeypatch.setenv("HOME", "/home/planner")
    monkeypatch.setenv("RUN", "my run")  # sh splits an unquoted variable's value: "$RUN" must stay quoted
    path = _with_entrypoint_lines(tmp_path, """  --lr_scheduler_kwargs '{"min_lr": 1e-6}'
  --system_prompt 'You are a careful math tutor: $5 is five dollars.'
  --run_name "Tom's run in \\$HOME"
  --cache_dir $HOME/hf_cache
  --hub_model_id ~/'my model'
  --report_to ''
  --output_dir "$RUN"
""")
    before = Experiment.load(path)
    assert before.script_args()[:14] == [
        "--lr_scheduler_kwargs", '{"min_lr": 1e-6}', "--system_prompt", "You are a careful math tutor: $5 is five "
        "dollars.", "--run_name", "Tom's run in $HOME", "--cache_dir", "/home/planner/hf_cache", "--hub_model_id",
        "/home/planner/my model", "--report_to", "", "--output_dir", "my run"]
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=79.1, seq=2048, lora=True, global_batch=32)
    write_into(path, flags_for(chosen, 2048), gpus=1)
    after = Experiment.load(path)
    for expand in (False, True):
        assert _unplanned(after.script_args(expand)) == _unplanned(before.script_args(expand))
    # What the cluster does with it: sh -c, in an environment of its own.
    printf = after.config["entrypoint"].replace("python3 run_clm.py", "printf '%s\\0'", 1)
    run = subprocess.run(["sh", "-c", printf], capture_output=True, text=True,
                         env={"HOME": "/home/planner", "RUN": "my run"})
    assert run.stdout.split("\0")[:-1] == after.script_args()
    assert '--cache_dir "$HOME"/hf_cache\n' in path.read_text()  # the variable, not this machine's HOME
    assert check_experiment(path).problems == []


@pytest.mark.parametrize("lines", ["  --bf16 true\n  --packing True\n", "  --bf16=true\n  --packing=false\n"])
def test_write_into_drops_what_argparse_takes_with_a_planned_flag(tmp_path, lines):
    """HfArgumentParser's boolean flags take an optional value, and any flag may be written --flag=value: a `true`
    left behind was an unknown run_clm.py flag, a --deepspeed=... left behind kept DeepSpeed in a plan without it."""
    path = _with_entrypoint_lines(tmp_path, lines + "  --deepspeed=ds_configs/ds_config_stage_3.json\n"
                                  "  --per-device-train-batch-size 16\n")
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=1, gpu_mem=79.1, seq=2048, lora=True, global_batch=32)
    write_into(path, flags_for(chosen, 2048), gpus=1)
    args = Experiment.load(path).script_args()
    assert not {"true", "True", "false"} & set(args) and not any(a.startswith("--deepspeed") for a in args)
    assert not any(a.startswith("--per-device") for a in args) and args.count("--per_device_train_batch_size") == 1
    assert args.count("--bf16") == args.count("--packing") == 1
    assert check_experiment(path).problems == []


def test_write_into_sets_slots_per_trial_not_a_comment_that_mentions_it(tmp_path):
    """local_tiny_ds3.yaml's header says (slots_per_trial: 2): the comment changed and the key kept 2 GPUs while the
    batch sizes were planned for 4."""
    path = tmp_path / "exp.yaml"
    shutil.copy(REPO / "experiments/local_tiny_ds3.yaml", path)
    comment = path.read_text().splitlines()[2]
    assert "(slots_per_trial: 2)" in comment
    chosen = plan(KNOWN_SHAPES["swallow-7b"], gpus=4, gpu_mem=79.1, seq=2048, lora=True, global_batch=32)
    write_into(path, flags_for(chosen, 2048), gpus=4)
    assert path.read_text().splitlines()[2] == comment and Experiment.load(path).slots_per_trial == 4


@pytest.mark.parametrize("edit, says", [
    (lambda text: text.replace("  slots_per_trial: 1\n", ""), "resources has no `slots_per_trial: N` line"),
    (lambda text: text.replace("resources:\n  slots_per_trial: 1\n  resource_pool: A100\n",
                               "resources: {slots_per_trial: 1, resource_pool: A100}\n"),
     "resources has no `slots_per_trial: N` line"),
    (lambda text: text.replace("entrypoint: >-", "entrypoint: >"), "its entrypoint cannot be rewritten"),
])
def test_write_refuses_what_it_cannot_rewrite_and_writes_nothing(tmp_path, capsys, edit, says):
    path = tmp_path / "exp.yaml"
    path.write_text(edit((REPO / "experiments/swallow_7b.yaml").read_text()))
    before = path.read_text()
    assert main(["--model", "swallow-7b", "--gpus", "2", "--gpu-mem", "80", "--write", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --write {path}: {says}") and captured.err.count("\n") == 1
    assert captured.out == "" and path.read_text() == before


@pytest.mark.parametrize("gpu_mem, gpu, gib", [(80, "a100", 79.1), (40, "a100", 39.4), (80, None, 79.1),
                                               (40, None, 39.4), (141, "h200", 139.7), (48, None, 44.4),
                                               (79.6, "h100", 79.6), (None, "h200", 139.7), (None, "a100", 79.1)])
def test_gpu_mem_is_what_torch_reports_not_the_gb_a_card_is_sold_by(gpu_mem, gpu, gib):
    assert gpu_gib(gpu_mem, gpu)[0] == gib


def test_70b_on_eight_a100_40gb_keeps_the_headroom_of_the_real_card():
    """--gpu-mem 40 planned micro-batch 4 at 35.9 GiB: over 90% of the 39.5 GiB torch reports for an A100 40GB."""
    chosen = plan(KNOWN_SHAPES["swallow-70b"], gpus=8, gpu_mem=gpu_gib(40, None)[0], seq=2048, lora=True,
                  global_batch=64, gpu="a100")
    assert chosen.estimate.total <= 0.9 * 39.5 * GiB


def test_cli_takes_the_gpus_memory_from_gpu_and_says_when_nothing_gives_it(capsys):
    assert main(["--model", "swallow-70b", "--gpus", "4", "--gpu", "h200"]) == 0
    assert "on 4 x 139.7 GiB (h200, what torch.cuda reports for it):" in capsys.readouterr().out
    assert main(["--model", "swallow-70b", "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-mem: missing: pass GiB per GPU as torch.cuda reports it")
    assert err.count("\n") == 1
