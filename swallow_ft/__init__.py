import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # where relative paths in the shipped configs start

# Deprecations inside the pinned libraries, not in our calls, repeated every step: deepspeed 0.19.8's ZeRO collectives
# call torch's old names (several warnings per step and rank), and peft 0.21 reads transformers' old
# is_gradient_checkpointing. They were 220 of the 265 lines a 4-step run of experiments/local_tiny_ds3.yaml printed.
warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                        FutureWarning)
warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
