"""Finetuning tasks: user data in SQuAD / text-label formats, bad data (one sentence, exit 2), span
decoding, the ListOps generator against LRA's rules, and `longctx finetune` end to end."""
import json
import random

import numpy as np
import pytest
import torch

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.tasks import listops
from longctx.train.finetune import finetune_config, task_class

TINY = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.window=8",
        "model.max_position_embeddings=256", "data.seq_len=256", "data.tokenizer=bytes", "train.steps=2",
        "train.batch_size=2", "train.save_every=0", "train.log_every=1", "task.bootstrap=50"]


def _squad_rows(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = []
    for i in range(n):
        key, ans = rng.sample(words, 2)
        filler = " ".join(rng.choice(["lorem", "ipsum", "dolor"]) for _ in range(20))
        context = f"{filler} {key} {ans} {filler}."
        rows.append({"id": f"q{i}", "question": key, "context": context,
                     "answers": {"text": [ans], "answer_start": [context.index(f" {key} ") + len(key) + 2]}})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _qa_files(tmp_path, rows_by_split):
    return [f"task.{s}_file=" + _write_jsonl(tmp_path / f"{s}.jsonl", rows) for s, rows in rows_by_split.items()]


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_squad_file_goes_through_finetune_and_writes_results(tmp_path, capsys):
    files = _qa_files(tmp_path, {"train": _squad_rows(6), "dev": _squad_rows(3, 1), "test": _squad_rows(3, 2)})
    out = tmp_path / "run"
    code, err = _run(["finetune", "--task", "qa", "--out", str(out), "--quiet", *TINY, *files], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    for split in ("eval", "test"):
        ev = res[split]
        assert ev["examples"] == 3
        for m in ("exact_match", "f1"):
            assert 0.0 <= ev[m] <= 1.0 and ev[f"{m}_ci"][0] <= ev[m] <= ev[f"{m}_ci"][1]
    assert res["primary_metric"] == "f1" and res["task"] == "qa"
    assert (out / "model" / "config.json").exists()


def test_official_nested_squad_json_loads(tmp_path):
    from longctx.tasks.files import read_records
    rows = _squad_rows(2)
    nested = {"data": [{"title": "t", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                           "answers": [{"text": r["answers"]["text"][0],
                                                        "answer_start": r["answers"]["answer_start"][0]}]}]}
        for r in rows]}]}
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(nested))
    got = read_records(p)
    from longctx.tasks.qa import check_record
    assert [check_record(g, "x")["answers"] for g in got] == [r["answers"] for r in rows]


@pytest.mark.parametrize("bad, phrase", [
    ("answer_start", "does not point at the answer"),
    ("missing", "has no field 'question'"),
    ("empty", "split of task 'qa' is empty"),
])
def test_bad_qa_data_is_one_sentence_and_exit_2(tmp_path, capsys, bad, phrase):
    train = _squad_rows(4)
    if bad == "answer_start":
        train[2]["answers"]["answer_start"] = [train[2]["answers"]["answer_start"][0] + 1]
    if bad == "missing":
        del train[1]["question"]
    dev = [] if bad == "empty" else _squad_rows(2, 1)
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    files = _qa_files(tmp_path, {"train": train, "test": _squad_rows(2, 2)}) + [f"task.dev_file={tmp_path / 'dev.jsonl'}"]
    code, err = _run(["finetune", "--task", "qa", "--out", str(tmp_path / "r"), "--quiet", *TINY, *files], capsys)
    assert code == 2
    assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_label_set_differing_between_train_and_test_is_refused(tmp_path, capsys):
    rows = lambda labels: [{"text": f"document {i} " * 5, "label": lab} for i, lab in enumerate(labels)]  # noqa: E731
    files = [f"task.train_file={_write_jsonl(tmp_path / 'tr.jsonl', rows(['a', 'b', 'a']))}",
             f"task.dev_file={_write_jsonl(tmp_path / 'dv.jsonl', rows(['a', 'b']))}",
             f"task.test_file={_write_jsonl(tmp_path / 'te.jsonl', rows(['a', 'c']))}"]
    code, err = _run(["finetune", "--task", "classification", "--out", str(tmp_path / "r"), "--quiet", *TINY, *files],
                     capsys)
    assert code == 2 and "label(s) ['c']" in err and "test split" in err, err


def test_classification_reads_csv_and_parquet(tmp_path):
    import datasets
    rows = [{"text": f"text number {i}", "label": ["x", "y"][i % 2]} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    for f in ("d.parquet", "d.csv"):
        cfg = finetune_config("classification", {}, TINY + [f"task.{s}_file={tmp_path / f}" for s in ("train", "dev", "test")])
        task = task_class("classification")(cfg)
        task.prepare()
        assert task.labels == ["x", "y"] and len(task.splits["test"]) == 6
        feats = task.train_examples(256)
        assert feats[0]["input_ids"][0] == task.tokenizer.cls_id and [f["label"] for f in feats] == [0, 1] * 3


def test_unknown_task_option_is_refused():
    with pytest.raises(LongctxError, match="unknown config key 'task.nope'"):
        finetune_config("qa", {}, ["task.nope=1"])
    with pytest.raises(LongctxError, match="task.global_tokens"):
        finetune_config("qa", {}, ["task.global_tokens=first"])


def test_qa_features_cover_the_answer_and_decode_it_back(tmp_path):
    """Long contexts are chunked with overlap; every chunk holding the answer labels exactly its tokens,
    and decoding one-hot logits at those positions gives back the answer text (EM 1)."""
    rows = _squad_rows(5)
    for r in rows:  # longer than one sequence: several chunks
        r["context"] = "x " * 150 + r["context"] + " y" * 150
        r["answers"]["answer_start"] = [r["answers"]["answer_start"][0] + 300]
    files = _qa_files(tmp_path, {"train": rows, "dev": rows, "test": rows})
    cfg = finetune_config("qa", {}, TINY + files + ["task.doc_stride=32"])
    task = task_class("qa")(cfg)
    task.prepare()
    train = task.train_examples(256)
    for f in train:
        r = rows[f["record"]]
        text = task.tokenizer.decode(f["input_ids"][f["start"]:f["end"] + 1])
        assert text.strip() == r["answers"]["text"][0]
    feats = task.eval_examples("dev", 256)
    assert len(feats) > len(rows)  # several chunks per record
    outs = []
    for f in feats:
        s, e = torch.zeros(len(f["input_ids"])), torch.zeros(len(f["input_ids"]))
        match = [t for t in train if t["record"] == f["record"] and t["chunk"] == f["chunk"]]
        if match:
            s[match[0]["start"]], e[match[0]["end"]] = 10.0, 10.0
        outs.append((s, e))
    ev = task.score("dev", feats, outs)
    assert ev["exact_match"] == 1.0 and ev["f1"] == 1.0


def test_span_decoding_respects_max_answer_length(tmp_path):
    files = _qa_files(tmp_path, {s: _squad_rows(2) for s in ("train", "dev", "test")})
    cfg = finetune_config("qa", {}, TINY + files + ["task.max_answer_length=3"])
    task = task_class("qa")(cfg)
    f = {"ctx_start": 2, "offsets": [(i, i + 1) for i in range(10)]}
    s, e = torch.zeros(12), torch.zeros(12)
    s[2 + 1], e[2 + 8] = 5.0, 6.0  # the best pair is 8 tokens long: not allowed
    e[2 + 2] = 1.0
    score, i, j = task.best_span(s, e, f)
    assert (i, j) == (1, 2) and score == 6.0
    s[2 + 9] = 20.0  # an end before its start never wins
    score, i, j = task.best_span(s, e, f)
    assert i == 9 and j == 9


# ---- ListOps: LRA's generator (google-research/long-range-arena, lra_benchmarks/data/listops.py),
# transcribed: it draws from the module-level `random`, builds right-nested tuples and evaluates them.
def _lra_generate_tree(depth, max_depth, max_args):
    r = random.random() if depth < max_depth else 1
    if r > 0.25:
        return random.choice(range(10)), 1
    length = 2
    num_values = random.randint(2, max_args)
    values = []
    for _ in range(num_values):
        sub_t, sub_l = _lra_generate_tree(depth + 1, max_depth, max_args)
        values.append(sub_t)
        length += sub_l
    op = random.choice(["[MIN", "[MAX", "[MED", "[SM"])
    t = (op, values[0])
    for value in values[1:]:
        t = (t, value)
    return (t, "]"), length


def _lra_to_value(t):
    if not isinstance(t, tuple):
        return t
    left, right = _lra_to_value(t[0]), _lra_to_value(t[1])
    if left in ["[MIN", "[MAX", "[MED", "[SM"]:
        return (left, [right])
    if right == "]":
        return {"[MIN": min, "[MAX": max, "[MED": lambda v: int(np.median(v)),
                "[SM": lambda v: np.sum(v) % 10}[left[0]](left[1])
    return (left[0], left[1] + [right])


def _lra_tokens(t):
    if not isinstance(t, tuple):
        return [str(t)]
    return _lra_tokens(t[0]) + _lra_tokens(t[1])


def test_listops_generator_equals_lra_generator():
    for seed in range(30):
        random.seed(seed)
        want, want_len = _lra_generate_tree(1, 6, 5)
        got, got_len = listops.generate_tree(random.Random(seed), 1, 6, 5)
        assert got_len == want_len == len([t for t in listops.to_tokens(got)])
        assert listops.to_tokens(got) == _lra_tokens(want)
        assert listops.evaluate_tree(got) == int(_lra_to_value(want))


def test_listops_data_respects_limits_and_is_seeded():
    a = listops.generate(50, 3, max_depth=4, max_args=5, min_length=10, max_length=40)
    b = listops.generate(50, 3, max_depth=4, max_args=5, min_length=10, max_length=40)
    assert a == b
    assert all(10 < len(r["tokens"]) < 40 for r in a)
    assert len({" ".join(r["tokens"]) for r in a}) == 50
    assert {r["label"] for r in a} <= set(range(10))
    cfg = finetune_config("listops", {}, ["task.train_size=40", "task.dev_size=10", "task.test_size=10",
                                          "task.max_depth=3", "task.min_length=5", "task.max_length=30",
                                          "data.seq_len=64", "model.window=4"])
    task = task_class("listops")(cfg)
    task.prepare()
    train = {" ".join(r["tokens"]) for r in task.splits["train"]}
    assert not train & {" ".join(r["tokens"]) for r in task.splits["test"]}  # no test expression trained on


def test_qa_finetuning_batch_and_plain_model_call_agree(tmp_path):
    """One definition of QA's global tokens: the batch finetuning trains and evaluates on makes global
    exactly what the model's own default does (<cls> and the question, not the <sep>), so the finetuned
    model computes the same function in a plain model(...) call (and in the export, which makes that call)."""
    from longctx.models import question_global_mask

    rows = _squad_rows(6)
    files = _qa_files(tmp_path, {"train": rows, "dev": rows, "test": rows})
    task = task_class("qa")(finetune_config("qa", {}, TINY + files))
    task.prepare()
    tok = task.tokenizer
    train = task.train_examples(256)
    batch = task.collate(train)  # a training batch
    assert torch.equal(batch["global_attention_mask"], question_global_mask(batch["input_ids"], tok.sep_id))
    for row, f in enumerate(train):
        question = list(f["input_ids"]).index(tok.sep_id)  # <cls> + question tokens
        assert batch["global_attention_mask"][row].nonzero().flatten().tolist() == list(range(question))
    feats = task.eval_examples("dev", 256)
    batch = task.inputs(feats)  # an evaluation batch
    ids = batch["input_ids"]
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        trained = model(**task.inputs(feats))
        plain = model(input_ids=ids, attention_mask=batch["attention_mask"])
    assert torch.equal(trained.start_logits, plain.start_logits)
    assert torch.equal(trained.end_logits, plain.end_logits)


def test_qa_chunking_that_cannot_advance_or_grows_too_long_is_refused(tmp_path, capsys):
    """A doc_stride that leaves the chunks no step (it used to become 1: a feature per token) is one
    sentence; so is a context needing more than task.max_chunks chunks, which features a raised cap."""
    rows = _squad_rows(3)
    rows[1]["context"] += " filler" * 2000  # ~14,000 byte tokens
    files = _qa_files(tmp_path, {"train": rows, "dev": rows, "test": rows})
    code, err = _run(["finetune", "--task", "qa", "--out", str(tmp_path / "r"), "--quiet", *TINY, *files,
                      "task.doc_stride=189"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "leaves 189 context tokens" in err and "task.doc_stride=189" in err

    task = task_class("qa")(finetune_config("qa", {}, TINY + files + ["task.max_chunks=100"]))
    task.prepare()
    with pytest.raises(LongctxError, match=r"q1: its context of \d+ tokens makes 119 chunks .* task.max_chunks=100"):
        task.eval_examples("dev", 256)
    task.opts["max_chunks"] = 119
    feats = task.eval_examples("dev", 256)
    assert sum(f["record"] == 1 for f in feats) == 119
    assert all(len(f["input_ids"]) <= 256 for f in feats)
