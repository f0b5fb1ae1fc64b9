"""The data path as training uses it: packing without contamination, loss normalisation, policies, preview."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.data import build_collator, build_datasets
from swallow_ft.data.encoding import IGNORE
from swallow_ft.data.packing import PackedCollator, pack
from swallow_ft.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    return model


def training_args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def data_args(**kw):
    return DataTrainingArguments(**{"train_file": str(REPO / "data/camel_math_ja.jsonl"), **kw})


def examples(tokenizer):
    texts = ["81 と 70 の和を求めなさい。", "方程式 3x + 4 = 19 を解きなさい。 x = 5 です。", "こんにちは"]
    return [tokenizer(t).input_ids for t in texts]


def test_packed_rows_give_exactly_the_per_example_logits(model, tokenizer):
    rows = examples(tokenizer)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows]
        flat = torch.tensor([sum(rows, [])])
        restart = torch.tensor([sum((list(range(len(ids))) for ids in rows), [])])
        packed = model(input_ids=flat, position_ids=restart).logits[0]
        naive = model(input_ids=flat).logits[0]  # plain concatenation: later examples see earlier ones
    expected = torch.cat(alone)
    assert torch.allclose(packed, expected, atol=1e-5)
    later = slice(len(rows[0]), None)
    assert (naive[later] - expected[later]).abs().max() > 1e-2  # the check above can see contamination


def test_pack_fills_rows_and_the_collator_restarts_positions(tokenizer):
    from datasets import Dataset

    lengths = [5, 3, 7, 2, 6]
    ds = Dataset.from_dict({"input_ids": [[7] * n for n in lengths], "labels": [[7] * n for n in lengths]})
    packed = pack(ds, block_size=10)
    # First-fit decreasing: 7+3, 6+2, 5.
    assert sorted(packed["position_ids"], key=len) == [
        [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    batch = PackedCollator(pad_token_id=0)([packed[0], packed[2]])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[1] == max(len(packed[0]["input_ids"]), len(packed[2]["input_ids"]))
    assert (batch["labels"] == IGNORE).sum() == abs(len(packed[0]["input_ids"]) - len(packed[2]["input_ids"]))
    # A fixed width (what --torch_compile uses: one static shape): the padding is its own position run, never trained.
    fixed = PackedCollator(pad_token_id=0, width=12)([packed[0], packed[2]])
    assert fixed["input_ids"].shape == (2, 12)
    assert fixed["position_ids"][0].tolist() == packed[0]["position_ids"] + list(range(12 - len(packed[0]["input_ids"])))
    assert torch.equal(fixed["labels"][:, :batch["labels"].shape[1]][batch["labels"] != IGNORE],
                       batch["labels"][batch["labels"] != IGNORE])
    assert (fixed["labels"] != IGNORE).sum() == (batch["labels"] != IGNORE).sum()


def test_unpacked_batches_pad_to_the_longest_row_not_block_size(tokenizer, tmp_path):
    data = build_datasets(data_args(block_size=512, prompt_format="swallow-instruct-v0.1"),
                          training_args(tmp_path), tokenizer, "tiny")
    rows = [data.train[i] for i in range(4)]
    batch = build_collator(tokenizer, packing=False)(rows)
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows) < 512
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 4  # EOS trained, never masked as padding


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_gradient_accumulation_normalises_per_token(tiny_model, tokenizer, tmp_path):
    """1 x batch 4 and 4 x batch 1 must give the same gradient: a mean over trained tokens."""
    data = build_datasets(data_args(prompt_format="swallow-instruct-v0.1", max_train_samples=4),
                          training_args(tmp_path), tokenizer, "tiny")
    n_trained = [sum(label != IGNORE for label in r["labels"]) for r in data.train]
    assert len(set(n_trained)) > 1  # unequal lengths, or a mean of per-batch means would also pass

    grads = []
    for batch, accumulation in ((4, 1), (1, 4)):
        capture = GradCapture()
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        args = training_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             max_steps=1, learning_rate=0.0, train_sampling_strategy="sequential", save_strategy="no")
        Trainer(model=model, args=args, train_dataset=data.train, data_collator=build_collator(tokenizer, False),
                callbacks=[capture]).train()
        grads.append(capture.grads)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_overlong_policy_and_examples_with_no_reply_left(tokenizer, tmp_path, caplog):
    # block_size 30 is shorter than the default system prompt: every reply is cut away
    with pytest.raises(UserError, match="no example is left to train on"):
        build_datasets(data_args(block_size=30, prompt_format="swallow-instruct-v0.1"), training_args(tmp_path),
                       tokenizer, "tiny")
    kept = build_datasets(data_args(block_size=60, prompt_format="swallow-instruct-v0.1"), training_args(tmp_path),
                          tokenizer, "tiny")
    dropped = build_datasets(data_args(block_size=60, prompt_format="swallow-instruct-v0.1", overlong="drop"),
                             training_args(tmp_path), tokenizer, "tiny")
    assert len(dropped.train) < len(kept.train)
    assert all(len(r) <= 60 for r in kept.train["input_ids"])
    assert "longer than block_size were truncated (--overlong truncate)" in caplog.text


def chat(i, second_role="assistant"):
    return {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": second_role, "content": f"{i + 1}"}]}


def test_bad_rows_stop_with_the_line_or_are_skipped_and_counted(tokenizer, tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    rows = [chat(i) for i in range(30)] + [chat(30, second_role="user")] + [chat(i) for i in range(31, 40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = dict(train_file=str(path), prompt_format="swallow-instruct-v0.1", validation_split_percentage=10)
    # The 31st line: what an editor shows, not the 0-based row index 30.
    with pytest.raises(UserError, match=f"{path} line 31: messages 0.. have roles \\['user', 'user'\\]"):
        build_datasets(DataTrainingArguments(**args), training_args(tmp_path), tokenizer, "tiny")
    data = build_datasets(DataTrainingArguments(**args, skip_bad_rows=True), training_args(tmp_path), tokenizer, "tiny")
    assert len(data.train) + len(data.validation) == 39
    assert "skipped 1 bad rows" in caplog.text


def test_row_names_count_every_blank_line_before_the_row(tmp_path):
    """row_name runs once per row: it bisects the blank lines. Checked against reading the file line by line."""
    import random

    from swallow_ft.data.shapes import row_name

    rng = random.Random(0)
    lines = [rng.choice(["", "  ", '{"text": "x"}', '{"text": "y"}']) for _ in range(300)]
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    row_lines = [number for number, line in enumerate(lines, 1) if line.strip()]
    assert [row_name(str(path), index) for index in range(len(row_lines))] == [
        f"{path} line {number}" for number in row_lines]


def test_bad_rows_are_named_by_file_line_past_blank_lines_and_by_0_based_row_elsewhere(tokenizer, tmp_path):
    jsonl = tmp_path / "gaps.jsonl"  # the JSON reader skips blank lines, so row 2 is on line 5
    jsonl.write_text("\n".join([json.dumps(chat(0)), "", json.dumps(chat(1)), "   ", json.dumps(chat(2, "user"))]))
    with pytest.raises(UserError, match=f"^{jsonl} line 5: messages 0.. have roles"):
        build_datasets(DataTrainingArguments(train_file=str(jsonl)), training_args(tmp_path), tokenizer, "tiny")
    csv = tmp_path / "camel.csv"  # under a header: a line number would be off by one, so the index says 0-based
    csv.write_text("message_1,message_2\n1+1?,two\n2+1?,three\n3+1?,\n")
    with pytest.raises(UserError, match=f"^{csv} row 2 \\(0-based\\): column 'message_2' is missing or null"):
        build_datasets(DataTrainingArguments(train_file=str(csv)), training_args(tmp_path), tokenizer, "tiny")


def distinct_camel_rows(n):
    rows = {}
    for line in (REPO / "data/camel_math_ja.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault((row["message_1"], row["message_2"]), row)
    return list(rows.values())[:n]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_held_out_duplicates_of_training_examples_are_dropped_and_counted(tokenizer, tmp_path, caplog):
    rows = distinct_camel_rows(30)
    path = write_jsonl(tmp_path / "dups.jsonl", rows + [rows[0]] * 30)  # one example 31 times
    data = build_datasets(DataTrainingArguments(train_file=path, prompt_format="swallow-instruct-v0.1",
                                                validation_split_percentage=50), training_args(tmp_path), tokenizer,
                          "tiny")
    dropped = 30 - len(data.validation)
    assert dropped > 0 and len(data.train) == 30
    assert (f"{path} (held out): dropped {dropped} of 30 held-out validation examples identical (token for token) to "
            "a training example, so that eval_loss measures unseen data; deduplicate the data to keep them") \
        in caplog.text
    trained = {tuple(ids) for ids in data.train["input_ids"]}
    assert not [ids for ids in data.validation["input_ids"] if tuple(ids) in trained]


def test_a_validation_file_is_kept_as_given_with_a_warning_about_duplicates(tokenizer, tmp_path, caplog):
    rows = distinct_camel_rows(40)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows[30:33] + [rows[4], rows[7]])
    data = build_datasets(DataTrainingArguments(train_file=train, validation_file=validation,
                                                prompt_format="swallow-instruct-v0.1"), training_args(tmp_path),
                          tokenizer, "tiny")
    assert (len(data.train), len(data.validation)) == (30, 5)
    assert (f"{validation}: 2 of 5 validation examples are identical (token for token) to a training example, so "
            "eval_loss partly measures recall; remove them from the validation file") in caplog.text


def test_the_resolved_prompt_settings_are_what_a_checkpoint_records(tokenizer, tmp_path):
    auto = build_datasets(data_args(max_train_samples=4), training_args(tmp_path), tokenizer, "tiny")
    assert auto.prompt_settings() == {"prompt_format": "swallow-instruct-v0.1",
                                      "system_prompt": "あなたは誠実で優秀な日本人のアシスタントです。"}
    alpaca = build_datasets(data_args(prompt_format="swallow-instruct-v0", system_prompt="無視されます"),
                            training_args(tmp_path), tokenizer, "tiny")
    assert alpaca.prompt_settings() == {"prompt_format": "swallow-instruct-v0", "system_prompt": None}


def test_the_tokenised_cache_is_keyed_on_the_source_of_the_code_that_makes_the_tokens(tokenizer, tmp_path,
                                                                                      monkeypatch):
    from swallow_ft.data import loading, templates

    path = write_jsonl(tmp_path / "camel.jsonl", distinct_camel_rows(20))
    args = DataTrainingArguments(train_file=path)
    raw = loading.load_raw_datasets(args, cache_dir=tmp_path / "cache")["train"]

    def tokenise():
        return loading.encode_split(raw, path, "camel-math", templates.FORMATS["swallow-instruct-v0.1"], tokenizer,
                                    args, 256)

    def cache_files():
        return set((tmp_path / "cache").rglob("cache-*.arrow"))

    first = tokenise()
    written = cache_files()
    assert tokenise()._fingerprint == first._fingerprint and cache_files() == written  # same code: a hit

    source = Path(templates.__file__).read_text(encoding="utf-8")
    for name, text in (("same.py", source), ("edited.py", source + "# an edit\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(templates, "__file__", str(tmp_path / "same.py"))
    assert tokenise()._fingerprint == first._fingerprint and cache_files() == written
    monkeypatch.setattr(templates, "__file__", str(tmp_path / "edited.py"))  # templates.py edited: a miss
    edited = tokenise()
    assert edited._fingerprint != first._fingerprint and len(cache_files() - written) == 1
    assert edited["input_ids"] == first["input_ids"]


def test_packing_is_cached_under_the_source_of_packing_too(monkeypatch):
    from datasets import Dataset

    from swallow_ft.data import fingerprint

    ds = Dataset.from_dict({"input_ids": [[7] * 3, [7] * 2], "labels": [[7] * 3, [7] * 2]})
    before = pack(ds, 8)._fingerprint
    assert pack(ds, 8)._fingerprint == before
    real = fingerprint.module_source_hash
    monkeypatch.setattr(fingerprint, "module_source_hash", lambda modules: "edited " + real(modules))
    assert pack(ds, 8)._fingerprint != before


def test_packing_reports_its_efficiency(tokenizer, tmp_path):
    data = build_datasets(data_args(block_size=256, prompt_format="swallow-instruct-v0.1", packing=True),
                          training_args(tmp_path), tokenizer, "tiny")
    assert set(data.train.column_names) == {"input_ids", "labels", "position_ids"}
    assert all(len(r) <= 256 for r in data.train["input_ids"])
    assert 0.8 < data.packing_efficiency <= 1.0


def test_preview_json_shows_exactly_what_is_trained(tiny_model):
    result = subprocess.run([sys.executable, "-m", "swallow_ft.data", "preview", "--config",
                             "experiments/local_tiny.yaml", "--n", "2", "--format", "json"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0] == {
        "text": "<s> [INST] <<SYS>>\nあなたは誠実で優秀な日本人のアシスタントです。\n<</SYS>>\n\n"
                "81 と 70 の和を求めなさい。 [/INST] 81 + 70 = 151 です。答え: 151 </s>",
        "train_text": "81 + 70 = 151 です。答え: 151 </s>", "n_tokens": 58, "n_train_tokens": 22}
    assert len(rows) == 2 and rows[1]["train_text"].endswith("答え: 1 </s>")


def test_preview_text_marks_trained_spans(tiny_model):
    result = subprocess.run([sys.executable, "-m", "swallow_ft.data", "preview", "--model_name_or_path",
                             str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--n", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data/chat_ja.jsonl line 1 · swallow-instruct-v0.1" in result.stdout
    assert "[/INST]⟦ 32 + 13 = 45 です。 </s>⟧<s> [INST] その答えを 4 倍にしてください。 [/INST]⟦" in result.stdout


NO_ROWS = ": no rows: add examples to it or point --train_file at another file"
BROKEN_FILES = {  # name: (contents, message after the path)
    "empty.jsonl": ("", NO_ROWS),
    "blank_lines.jsonl": ("\n  \n", NO_ROWS),
    "empty_array.json": ("[]\n", NO_ROWS),
    "header_only.csv": ("message_1,message_2\n", NO_ROWS),
    # line 4, past a blank line: what an editor shows
    "broken.jsonl": ('{"text": "a"}\n{"text": "b"}\n\n{"text" "c"}\n{"text": "d"}\n',
                     " line 4: not valid JSON (Expecting ':' delimiter): fix or remove the line"),
    "pretty.json": ('[\n  {"text": "a"},\n  {"text" "b"}\n]\n',
                    " line 3: not valid JSON (Expecting ':' delimiter at column 11): fix it"),
}


@pytest.mark.parametrize("name", BROKEN_FILES)
def test_empty_or_malformed_files_name_the_file_and_line(name, tmp_path):
    from swallow_ft.data.loading import load_raw_datasets

    contents, message = BROKEN_FILES[name]
    path = tmp_path / name
    path.write_text(contents)
    with pytest.raises(UserError) as raised:
        load_raw_datasets(DataTrainingArguments(train_file=str(path)), cache_dir=str(tmp_path / "cache"))
    assert str(raised.value) == f"{path}{message}"


def test_an_empty_validation_file_names_its_flag_and_good_files_stay_cached(tmp_path):
    from swallow_ft.data.loading import load_raw_datasets

    empty = tmp_path / "val.jsonl"
    empty.write_text("")
    args = DataTrainingArguments(train_file=str(REPO / "data/camel_math_ja.jsonl"), validation_file=str(empty))
    with pytest.raises(UserError, match=f"^{empty}: no rows: add examples to it or point --validation_file at"):
        load_raw_datasets(args, cache_dir=str(tmp_path / "cache"))
    good = data_args()
    first = load_raw_datasets(good, cache_dir=str(tmp_path / "cache"))["train"].cache_files
    assert first and load_raw_datasets(good, cache_dir=str(tmp_path / "cache"))["train"].cache_files == first


def test_preview_of_a_broken_file_is_one_line_without_a_traceback(tiny_model, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(30)) + '{"text": "a",\n')
    result = subprocess.run([sys.executable, "-m", "swallow_ft.data", "preview", "--model_name_or_path",
                             str(tiny_model), "--train_file", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path} line 31: not valid JSON (Expecting property name enclosed in double quotes): fix or remove "
        "the line")
    # datasets' own report of it (row 30, counted from 0), printed twice, came first
    assert "Failed to load JSON" not in result.stderr and "in row 30" not in result.stderr


def test_what_datasets_logs_while_loading_is_dropped_only_when_the_one_line_replaces_it(caplog):
    import logging

    from swallow_ft.data.loading import _HeldBuilderLogs

    reader = logging.getLogger("datasets.packaged_modules.json.json")
    for raised, shown in ((UserError("f.jsonl line 7: not valid JSON"), False), (ValueError("unexplained"), True)):
        caplog.clear()
        with pytest.raises(type(raised)), _HeldBuilderLogs():
            reader.error("Failed to load JSON from file 'f.jsonl'")
            raise raised
        assert ("Failed to load JSON" in caplog.text) is shown
    with _HeldBuilderLogs():
        reader.warning("a warning from a load that worked")
    assert "a warning from a load that worked" in caplog.text


def test_a_missing_data_file_names_the_flag_that_gave_it(tmp_path):
    from swallow_ft.data.loading import load_raw_datasets

    missing = tmp_path / "missing.jsonl"
    for args, flag in ((dict(train_file=str(missing)), "--train_file"),
                       (data_args(validation_file=str(missing)), "--validation_file")):
        with pytest.raises(UserError) as raised:
            load_raw_datasets(args if isinstance(args, DataTrainingArguments) else DataTrainingArguments(**args))
        assert str(raised.value) == f"{missing}: data file not found: check the path given to {flag}"


def test_csv_cells_are_text_and_json_keeps_its_types(tokenizer, tmp_path):
    """CSV has no types: pandas guessed numbers for an answer column of numbers, which no row could then fix."""
    from swallow_ft.data.loading import load_raw_datasets

    csv = tmp_path / "alp.csv"
    csv.write_text("instruction,output,input\n1+1は?,2,\n価格は?,2.50,円で\n略語は?,NA,None\n空は?,,\n",
                   encoding="utf-8")
    rows = load_raw_datasets(DataTrainingArguments(train_file=str(csv)), cache_dir=str(tmp_path / "cache"))["train"]
    assert rows["output"] == ["2", "2.50", "NA", None]  # an empty cell is missing, as before
    assert rows["input"] == [None, "円で", "None", None]
    with pytest.raises(UserError) as raised:
        build_datasets(DataTrainingArguments(train_file=str(csv)), training_args(tmp_path), tokenizer, "tiny")
    assert str(raised.value) == (f"{csv} row 3 (0-based): column 'output' is missing or null; fill it in or drop the "
                                 "row")
    data = build_datasets(DataTrainingArguments(train_file=str(csv), skip_bad_rows=True, validation_file=str(csv)),
                          training_args(tmp_path), tokenizer, "tiny")
    assert len(data.train) == 3
    jsonl = tmp_path / "alp.jsonl"
    jsonl.write_text(json.dumps({"instruction": "1+1は?", "output": 2}) + "\n")
    with pytest.raises(UserError) as raised:
        build_datasets(DataTrainingArguments(train_file=str(jsonl)), training_args(tmp_path), tokenizer, "tiny")
    assert str(raised.value) == f"{jsonl} line 1: output must be a string, got int; convert it to text"


def test_two_ranks_tokenise_and_pack_once_and_data_options_reuse_the_tokens(tiny_model, tmp_path):
    """Rank 0 builds each stage (reading the file too) while rank 1 waits and reads the cache, --overwrite_cache
    included; options that do not change the tokens (--max_train_samples, --max_eval_samples) re-pack, but do not
    tokenise again."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(REPO / "tests/data_ranks.py"), str(tiny_model), str(REPO / "data/camel_math_ja.jsonl"),
                             str(tmp_path / "cache"), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    def computed(build):  # "Generating": datasets reading the file into its cache (the download, for a Hub id)
        return {stage for stage in ("Generating", "Tokenising", "Packing") if stage in build["log"]}

    assert [computed(build) for build in ranks[0]] == [{"Generating", "Tokenising", "Packing"},
                                                       {"Tokenising", "Packing"}, {"Packing"}]
    assert [computed(build) for build in ranks[1]] == [set(), set(), set()]
    for first, second in zip(*ranks):
        assert {k: first[k] for k in ("train", "validation", "rows")} == {
            k: second[k] for k in ("train", "validation", "rows")}
    assert ranks[0][2]["rows"] < ranks[0][0]["rows"]


def test_a_token_is_trained_exactly_when_it_overlaps_a_trained_span():
    """The vectorised labelling against its definition, zero-width tokens and touching spans included."""
    import random

    from swallow_ft.data.encoding import _label_run

    rng = random.Random(0)
    for _ in range(500):
        length = rng.randint(1, 12)
        cuts = sorted(rng.sample(range(length + 1), rng.randint(2, min(6, length + 1))))
        spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if rng.random() < 0.6]
        offsets = [tuple(sorted((rng.randint(-2, length + 3), rng.randint(-2, length + 3))))
                   for _ in range(rng.randint(1, 8))]
        ids = list(range(1, len(offsets) + 1))
        expected = [i if any(a < end and b > begin for begin, end in spans) else IGNORE
                    for i, (a, b) in zip(ids, offsets)]
        assert _label_run(ids, offsets, length, spans)[1].tolist() == expected, (length, spans, offsets)


def test_one_batch_tokenises_each_run_of_text_as_one_string(tokenizer):
    from swallow_ft.data.encoding import encode_batch
    from swallow_ft.data.templates import Special, Text

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples = [[Special(bos), Text("質問: 1+1? "), Text("答え: 2", trained=True), Special(eos, trained=True)],
                [], [Text("")], [Text("x"), Text("y", trained=True)], [Special(5, trained=True)]]
    batch = [(ids.tolist(), labels.tolist()) for ids, labels in encode_batch(examples, tokenizer)]

    def tokens(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    assert batch[0][0] == [bos] + tokens("質問: 1+1? 答え: 2") + [eos]
    assert tokenizer.decode([t for t in batch[0][1] if t != IGNORE]) == "答え: 2</s>"
    assert batch[1] == batch[2] == ([], [])
    assert batch[3][0] == tokens("xy") and batch[4] == ([5], [5])


def test_an_empty_split_is_named_in_one_line():
    from datasets import Dataset

    from swallow_ft.data.loading import keep_trainable

    empty = Dataset.from_dict({"input_ids": [], "labels": [], "n_train": [], "truncated": [], "bad": [], "key": []})
    with pytest.raises(UserError, match=r"^train.jsonl: the split has no rows"):
        keep_trainable(empty, "train.jsonl", data_args())


def test_a_validation_file_of_another_shape_is_one_line(tokenizer, tmp_path):
    """datasets read both files in one call, cast to the train file's columns: a DatasetGenerationError traceback."""
    from swallow_ft.preflight import Findings, check_data

    chat = REPO / "data/chat_ja.jsonl"
    args = data_args(validation_file=str(chat))
    message = f"{chat} has messages rows but {REPO / 'data/camel_math_ja.jsonl'} has camel-math rows: give both " \
              "files one shape"
    with pytest.raises(UserError) as raised:
        build_datasets(args, training_args(tmp_path), tokenizer, "tiny", cache_dir=str(tmp_path / "cache"))
    assert str(raised.value) == message
    found = Findings()
    check_data(args, found)
    assert found.problems == [message]
