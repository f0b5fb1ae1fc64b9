"""Every shipped DeepSpeed config is one that transformers fills and DeepSpeed 0.19.8 accepts, in its precision."""

import json
import re
import subprocess
import sys

from conftest import REPO

# In a child process: DeepSpeed's config parser wants a process group, which must not leak into other tests.
CHECK = r"""
import json, os, sys, types
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

deepspeed.init_distributed(dist_backend="gloo")
for path in sys.argv[2:]:
    fp16 = path.endswith("_fp16.json")
    args = types.SimpleNamespace(world_size=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_grad_norm=1.0, learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999,
                                 adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False, fp16=fp16,
                                 fp16_full_eval=False, bf16=not fp16, bf16_full_eval=False,
                                 get_warmup_steps=lambda steps: 0)
    hf = HfTrainerDeepSpeedConfig(path)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=8192)), 100)
    config = DeepSpeedConfig(hf.config)
    print(json.dumps({"file": os.path.basename(path), "autos_left": '"auto"' in json.dumps(hf.config),
                      "stage": config.zero_config.stage, "bf16": config.bfloat16_config.enabled,
                      "fp16": config.float16_config.enabled, "train_batch_size": config.train_batch_size,
                      "offload": bool(config.zero_config.offload_optimizer)}))
"""


def test_shipped_configs_parse_in_their_precision():
    paths = sorted((REPO / "ds_configs").glob("*.json"))
    assert len(paths) == 7
    result = subprocess.run([sys.executable, "-c", CHECK, "29611", *map(str, paths)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [p["file"] for p in parsed] == [p.name for p in paths]
    for path, got in zip(paths, parsed):
        fp16 = path.name.endswith("_fp16.json")
        stage = int(re.search(r"stage_(\d)", path.name).group(1))
        assert got == {"file": path.name, "autos_left": False, "stage": stage, "bf16": not fp16, "fp16": fp16,
                       "train_batch_size": 8, "offload": "offload" in path.name}
