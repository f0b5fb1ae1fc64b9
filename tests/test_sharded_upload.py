"""DetCallback.on_save as a collective over real Determined distributed and checkpoint contexts.

Each rank is a thread with its own `det.core.DistributedContext` (Determined's ZMQ transport on localhost) and its own
Core API context over one shared-filesystem checkpoint storage, as on a cluster. The nodes are directories.
"""

import hashlib
import socket
import threading
from pathlib import Path

import determined as det
import pytest
from determined.core import _checkpoint
from transformers import TrainerControl, TrainerState, TrainingArguments

from swallow_ft.det_callback import DetCallback

STEP = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_on_every_rank(ranks, storage):
    """ranks: [(node_dir, local_rank, cross_rank, {file in checkpoint-STEP: bytes})]. Returns each rank's storage id
    after every rank's on_save, run at once as the Trainer's ranks would."""
    pub, pull, ids, errors = free_port(), free_port(), {}, []

    def rank_main(rank, node_dir, local_rank, cross_rank, files):
        try:
            folder = Path(node_dir) / f"checkpoint-{STEP}"
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            dist = det.core.DistributedContext(
                rank=rank, size=len(ranks), local_rank=local_rank,
                local_size=sum(r[2] == cross_rank for r in ranks), cross_rank=cross_rank,
                cross_size=len({r[2] for r in ranks}), chief_ip="127.0.0.1", pub_port=pub, pull_port=pull)
            with det.core._dummy_init(distributed=dist, checkpoint_storage=str(storage)) as core:
                args = TrainingArguments(output_dir=str(node_dir), save_total_limit=1, use_cpu=True, report_to="none")
                callback = DetCallback(core, args, strict_searcher=False)
                state = TrainerState(global_step=STEP, is_world_process_zero=rank == 0)
                callback.on_save(args, state, TrainerControl())
                ids[rank] = callback.last_storage_id
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(rank, *spec)) for rank, spec in enumerate(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    assert len(ids) == len(ranks) and len(set(ids.values())) == 1  # one checkpoint
    return ids[0]


@pytest.fixture
def hashed(monkeypatch):
    """Bytes Determined reads into memory to hash files that several ranks offer (its conflict check)."""
    read, real_md5 = [], hashlib.md5

    def md5(data=b"", *args, **kwargs):
        read.append(len(data))
        return real_md5(data, *args, **kwargs)

    monkeypatch.setattr(_checkpoint.hashlib, "md5", md5)
    return read


def test_ranks_of_one_node_upload_their_shared_folder_once_without_hashing_it(tmp_path, hashed):
    node = tmp_path / "node0"
    shard = b"x" * 1_000_000
    storage_id = save_on_every_rank([
        (node, 0, 0, {"adapter_model.safetensors": b"adapter", "global_step5/zero_pp_rank_0.pt": shard}),
        (node, 1, 0, {"global_step5/zero_pp_rank_1.pt": shard, "rng_state_1.pth": b"rng"}),
    ], tmp_path / "storage")
    uploaded = tmp_path / "storage" / storage_id / f"checkpoint-{STEP}"
    assert sorted(str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file()) == [
        "adapter_model.safetensors", "global_step5/zero_pp_rank_0.pt", "global_step5/zero_pp_rank_1.pt",
        "rng_state_1.pth"]
    assert hashed == []  # every rank listing the folder made each file a conflict, read whole by every rank


def test_every_node_uploads_its_shards_and_drops_the_folders_the_trainer_rotates(tmp_path, hashed):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    for node in (node0, node1):  # earlier checkpoints' folders, already in checkpoint storage
        for step in (1, 3):
            (node / f"checkpoint-{step}").mkdir(parents=True)
            (node / f"checkpoint-{step}" / "shard.pt").write_bytes(b"old")
    storage_id = save_on_every_rank([
        (node0, 0, 0, {"adapter_model.safetensors": b"adapter", "global_step5/zero_pp_rank_0.pt": b"0"}),
        (node1, 0, 1, {"global_step5/zero_pp_rank_1.pt": b"1", "rng_state_1.pth": b"rng"}),
    ], tmp_path / "storage")
    uploaded = tmp_path / "storage" / storage_id / f"checkpoint-{STEP}"
    assert (uploaded / "global_step5" / "zero_pp_rank_0.pt").read_bytes() == b"0"
    assert (uploaded / "global_step5" / "zero_pp_rank_1.pt").read_bytes() == b"1"
    assert hashed == []
    # --save_total_limit 1: the Trainer rotates node 0's folders (not run here); node 1's are the callback's job.
    assert sorted(p.name for p in node1.glob("checkpoint-*")) == [f"checkpoint-{STEP}"]
    assert sorted(p.name for p in node0.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3", f"checkpoint-{STEP}"]
