"""Real long-document datasets from local files (``task.dataset`` / ``task.schema``): a fixture in each
published schema (the field names and nesting of the dataset's card, written by the test itself: nothing
is downloaded) goes to the right task with the right labels; SQuAD's layouts as users have them; a wrong
schema or a missing field is one sentence and exit 2."""
import json
import random
import sys

import pytest

from longctx.cli import main
from longctx.train.finetune import finetune_config, task_class
from test_tasks import TINY, _squad_rows

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lagoon", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "willow", "xenon", "yarrow", "zephyr"]


def _doc(rng, answer, n=30):
    words = [rng.choice(["the", "river", "stone", "light", "north", "old", "town"]) for _ in range(n)]
    k = rng.randrange(5, n - 5)
    return " ".join(words[:k] + [f"near {answer} lies"] + words[k:]) + "."


def _names(i):
    return f"{WORDS[i % len(WORDS)].capitalize()}{i}"


# ---- fixtures in each published schema ------------------------------------------------------------
def triviaqa_rows(n, seed, labelled=True):
    rng, rows = random.Random(seed), []
    for i in range(n):
        ans = _names(i + 100 * seed)
        rows.append({
            "question": f"Which place is near question {i}?", "question_id": f"tc_{seed}_{i}", "question_source": "x",
            "entity_pages": {"doc_source": ["TagMe"], "filename": [f"P{i}.txt"], "title": [f"P{i}"],
                             "wiki_context": [_doc(rng, ans)]},
            "search_results": {"description": ["d"], "filename": ["f"], "rank": [0], "title": ["t"], "url": ["u"],
                               "search_context": ["web text " * 5]},
            "answer": ({"aliases": [ans, f"The {ans}"], "normalized_aliases": [ans.lower()], "matched_wiki_entity_name": "",
                        "normalized_matched_wiki_entity_name": "", "normalized_value": ans.lower(), "type": "WikipediaEntity",
                        "value": ans} if labelled else
                       {"aliases": [], "normalized_aliases": [], "matched_wiki_entity_name": "",
                        "normalized_matched_wiki_entity_name": "", "normalized_value": "", "type": "", "value": ""})})
    return rows


def hotpotqa_rows(n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        ans = _names(i + 100 * seed)
        yes_no = i == 0
        rows.append({"id": f"hp{seed}_{i}", "question": f"Where is thing {i}?", "answer": "yes" if yes_no else ans,
                     "type": "comparison" if yes_no else "bridge", "level": "medium",
                     "supporting_facts": {"title": [f"B{i}"], "sent_id": [1]},
                     "context": {"title": [f"A{i}", f"B{i}"],
                                 "sentences": [[f"{ans} is elsewhere. ", "Filler text. "],
                                               ["Some sentence. ", f"Thing {i} is at {ans}."]]}})
    return rows


def qasper_rows(n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        span, other = f"method {_names(i + 100 * seed)}", f"data {_names(i + 50 + 100 * seed)}"

        def ans(spans, free=""):
            return {"answer": [{"unanswerable": False, "extractive_spans": spans, "yes_no": None, "free_form_answer": free,
                                "evidence": ["ev"], "highlighted_evidence": ["ev"]}],
                    "annotation_id": ["a"], "worker_id": ["w"]}
        rows.append({"id": f"paper{seed}_{i}", "title": f"Paper {i}", "abstract": f"We study {span}. " + _doc(rng, "x"),
                     "full_text": {"section_name": ["Intro", "Data"],
                                   "paragraphs": [[_doc(rng, span)], [f"We use {other}.", _doc(rng, "y")]]},
                     "qas": {"question": ["What method?", "Which data?", "Is it good?"],
                             "question_id": [f"q{seed}_{i}_0", f"q{seed}_{i}_1", f"q{seed}_{i}_2"],
                             "nlp_background": ["", "", ""], "topic_background": ["", "", ""],
                             "paper_read": ["", "", ""], "search_query": ["", "", ""], "question_writer": ["", "", ""],
                             "answers": [ans([span]), ans([other]), ans([], "it is good")]},
                     "figures_and_tables": {"caption": [], "file": []}})
    return rows


def narrativeqa_rows(n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        ans = _names(i + 100 * seed)
        free = i % 3 == 0  # an answer the story does not contain: dropped
        story = _doc(rng, ans, 60)
        rows.append({"document": {"id": f"doc{seed}_{i}", "kind": "gutenberg", "url": "u", "file_size": 1, "word_count": 60,
                                  "start": "", "end": "", "summary": {"text": "s", "tokens": ["s"], "url": "", "title": "T"},
                                  "text": story},
                     "question": {"text": f"Who lies near {i}?", "tokens": ["Who"]},
                     "answers": [{"text": "nobody at all" if free else ans, "tokens": ["x"]},
                                 {"text": "a summary phrase", "tokens": ["y"]}]})
    return rows


def quality_rows(n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        opts = [_names(i + k * 7 + 100 * seed) for k in range(4)]
        gold = 1 + (i % 4)
        rows.append({"article_id": f"{seed}{i}", "set_unique_id": f"{seed}{i}_s", "batch_num": "1", "writer_id": "1",
                     "source": "Gutenberg", "title": f"Story {i}", "year": 1950, "author": "A", "topic": "t",
                     "article": _doc(rng, opts[gold - 1], 80),
                     "questions": [{"question": f"What lies near, {i}?", "question_unique_id": f"{seed}{i}_q1",
                                    "options": opts, "writer_label": gold, "gold_label": gold,
                                    "validation": [{"untimed_annotator_id": "0", "untimed_answer": gold,
                                                    "untimed_eval1_answerability": 1, "untimed_eval2_context": 1,
                                                    "untimed_best_distractor": 1}],
                                    "speed_validation": [{"speed_annotator_id": "0", "speed_answer": gold}],
                                    "difficult": 0}]})
    return rows


def scrolls_rows(kind, n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        ans = _names(i + 100 * seed)
        if kind == "quality":
            opts = [_names(i + k * 7 + 100 * seed) for k in range(4)]
            gold = i % 4
            inp = f"What lies near, {i}?\n\n (A) {opts[0]}\n (B) {opts[1]}\n (C) {opts[2]}\n (D) {opts[3]}\n\n\n" + _doc(rng, opts[gold])
            outs = [opts[gold]]
        elif kind == "contract_nli":
            inp = f"Party {i} shall not disclose.\n\n" + _doc(rng, "Contract")
            outs = [["Entailment", "Contradiction", "Not mentioned"][i % 3]]
        else:  # qasper, narrative_qa: two references of one question, one in the document
            inp = f"Who lies near {i}?\n\n" + _doc(rng, ans)
            outs = [ans, "not in the text at all"]
        rows += [{"id": f"s{seed}_{i}", "pid": f"s{seed}_{i}_{k}", "input": inp, "output": o} for k, o in enumerate(outs)]
    return rows


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(task, *overrides):
    t = task_class(task)(finetune_config(task, {}, TINY + list(overrides)))
    t.prepare()
    return t


def _check_spans(records, expect_in=None):
    for r in records:
        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][s:s + len(t)] == t
        if expect_in is not None:
            assert r["answers"]["text"][0] in expect_in, r["answers"]


# ---- each schema to its task, with the right labels ---------------------------------------------------------------
def test_triviaqa_jsonl_folder_with_an_unlabelled_test_split(tmp_path, capsys):
    d = tmp_path / "trivia"
    _jsonl(d / "train.jsonl", triviaqa_rows(30, 0))
    _jsonl(d / "validation.jsonl", triviaqa_rows(5, 1))
    _jsonl(d / "test.jsonl", triviaqa_rows(4, 2, labelled=False))
    t = _prepare("qa", f"task.dataset={d}", "task.schema=triviaqa")
    err = capsys.readouterr().err
    assert "test split has no answers" in err and "carved from train by document" in err, err
    assert len(t.splits["test"]) == 5 and len(t.splits["train"]) + len(t.splits["dev"]) == 30 and t.splits["dev"]
    for s in ("train", "dev", "test"):
        _check_spans(t.splits[s])
    gold = {r["question_id"]: r["answer"]["value"] for r in triviaqa_rows(5, 1)}
    assert all(r["answers"]["text"][0] == gold[r["id"]] for r in t.splits["test"])


def test_hotpotqa_parquet_shards_drop_yes_no_and_point_at_the_supporting_sentence(tmp_path, capsys):
    import datasets
    d = tmp_path / "hotpot" / "distractor"
    d.mkdir(parents=True)
    for s, n, seed in (("train", 12, 0), ("validation", 4, 1), ("test", 4, 2)):
        datasets.Dataset.from_list(hotpotqa_rows(n, seed)).to_parquet(str(d / f"{s}-00000-of-00001.parquet"))
    t = _prepare("qa", f"task.dataset={tmp_path / 'hotpot'}", "task.schema=hotpotqa")
    assert "1 of the train split's questions dropped (1: yes / no answer" in capsys.readouterr().err
    assert [len(t.splits[s]) for s in ("train", "dev", "test")] == [11, 3, 3]
    for r in t.splits["train"]:
        _check_spans([r])
        s = r["answers"]["answer_start"][0]
        assert r["context"][:s].rstrip().endswith("is at") and r["context"][s:].startswith(r["answers"]["text"][0])


def test_qasper_save_to_disk_keeps_extractive_spans_and_drops_free_form(tmp_path, capsys):
    import datasets
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(qasper_rows(n, seed))
                               for s, n, seed in (("train", 6, 0), ("validation", 2, 1), ("test", 2, 2))})
    dd.save_to_disk(str(tmp_path / "qasper"))
    t = _prepare("qa", f"task.dataset={tmp_path / 'qasper'}", "task.schema=qasper")
    assert "6 of the train split's questions dropped" in capsys.readouterr().err
    assert [len(t.splits[s]) for s in ("train", "dev", "test")] == [12, 4, 4]
    _check_spans(t.splits["train"])
    assert {r["answers"]["text"][0].split()[0] for r in t.splits["train"]} == {"method", "data"}


def test_narrativeqa_answers_in_the_story_become_spans_the_rest_are_dropped(tmp_path, capsys):
    import datasets
    for s, n, seed in (("train", 9, 0), ("validation", 6, 1), ("test", 6, 2)):
        (tmp_path / "nqa" / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(narrativeqa_rows(n, seed)).to_parquet(
            str(tmp_path / "nqa" / "data" / f"{s}-00000-of-00001.parquet"))
    t = _prepare("qa", f"task.dataset={tmp_path / 'nqa'}", "task.schema=narrativeqa")
    assert "3 of the train split's questions dropped" in capsys.readouterr().err
    assert [len(t.splits[s]) for s in ("train", "dev", "test")] == [6, 4, 4]
    _check_spans(t.splits["train"], expect_in={_names(i) for i in range(9)})


def test_scrolls_qa_merges_references_and_contract_nli_is_classification(tmp_path):
    for kind in ("qasper", "narrative_qa"):
        d = tmp_path / kind
        for s, seed in (("train", 0), ("validation", 1), ("test", 2)):
            _jsonl(d / f"{s}.jsonl", scrolls_rows(kind, 4, seed))
        t = _prepare("qa", f"task.dataset={d}", f"task.schema=scrolls_{kind}")
        assert len(t.splits["train"]) == 4  # two references of one id: one record
        _check_spans(t.splits["train"], expect_in={_names(i) for i in range(4)})
    d = tmp_path / "nli"
    for s, seed in (("train", 0), ("validation", 1), ("test", 2)):
        _jsonl(d / f"{s}.jsonl", scrolls_rows("contract_nli", 6, seed))
    t = _prepare("classification", f"task.dataset={d}", "task.schema=scrolls_contract_nli")
    assert t.labels == ["Contradiction", "Entailment", "Not mentioned"]
    assert t.splits["train"][0]["texts"][0].startswith("Party 0 shall not disclose.")


@pytest.mark.parametrize("schema", ["quality", "scrolls_quality"])
def test_quality_is_multiple_choice_with_the_gold_option(tmp_path, schema):
    d = tmp_path / schema
    for s, seed in (("train", 0), ("dev", 1), ("test", 2)):
        rows = quality_rows(8, seed) if schema == "quality" else scrolls_rows("quality", 8, seed)
        _jsonl(d / f"{schema}.{s}.jsonl", rows)
    t = _prepare("multiple_choice", f"task.dataset={d}", f"task.schema={schema}")
    rows = quality_rows(8, 0)
    for r, raw in zip(t.splits["train"], rows):
        assert len(r["options"]) == 4 and r["options"][r["label"]] in r["context"]
        if schema == "quality":
            q = raw["questions"][0]
            assert r["options"] == q["options"] and r["label"] == q["gold_label"] - 1
    assert sorted({r["label"] for r in t.splits["train"]}) == [0, 1, 2, 3]


# ---- SQuAD as users have it -----------------------------------------------------------------------------------------
def _nested(rows):
    return {"version": "1.1", "data": [{"title": f"T{i}", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                           "answers": [{"text": r["answers"]["text"][0],
                                                        "answer_start": r["answers"]["answer_start"][0]}]}]}]}
        for i, r in enumerate(rows)]}


def test_squad_official_train_and_dev_only_carves_dev_from_train(tmp_path, capsys):
    d = tmp_path / "squad"
    d.mkdir()
    (d / "train-v1.1.json").write_text(json.dumps(_nested(_squad_rows(30, 0))))
    (d / "dev-v1.1.json").write_text(json.dumps(_nested(_squad_rows(5, 1))))
    t = _prepare("qa", f"task.dataset={d}")
    assert "its dev split (5 examples) is the test split" in capsys.readouterr().err
    assert len(t.splits["test"]) == 5 and len(t.splits["train"]) + len(t.splits["dev"]) == 30 and t.splits["dev"]
    # by document: no title in two splits
    titles = {s: {r["id"] for r in t.splits[s]} for s in ("train", "dev")}
    assert not titles["train"] & titles["dev"]
    # the same with train_file and dev_file only
    t = _prepare("qa", f"task.train_file={d / 'train-v1.1.json'}", f"task.dev_file={d / 'dev-v1.1.json'}")
    assert len(t.splits["test"]) == 5


def test_squad_csv_as_datasets_exports_it_and_a_save_to_disk_folder(tmp_path):
    import datasets
    splits = {"train": _squad_rows(8, 0), "validation": _squad_rows(3, 1), "test": _squad_rows(3, 2)}
    for s, rows in splits.items():
        datasets.Dataset.from_list(rows).to_csv(str(tmp_path / f"{s}.csv"))
    assert "array([" in (tmp_path / "train.csv").read_text()  # numpy's repr, as datasets writes it
    t = _prepare("qa", *(f"task.{s}_file={tmp_path / f'{n}.csv'}" for s, n in
                         (("train", "train"), ("dev", "validation"), ("test", "test"))))
    assert [r["answers"] for r in t.splits["train"]] == [r["answers"] for r in splits["train"]]
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(tmp_path / "disk"))
    t = _prepare("qa", f"task.dataset={tmp_path / 'disk'}")
    assert [r["answers"] for r in t.splits["dev"]] == [r["answers"] for r in splits["validation"]]


# ---- one sentence, exit 2 -------------------------------------------------------------------------------------------
def _finetune(capsys, task, tmp_path, *args):
    code = main(["finetune", "--task", task, "--out", str(tmp_path / "run"), "--quiet", *TINY, *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case, phrase", [
    ("wrong_schema", "has no field 'question_id' of the triviaqa schema"),
    ("missing_field", "has no field 'abstract' of the qasper schema"),
    ("wrong_task", "task.schema=quality is multiple choice (--task multiple_choice), not task 'qa'"),
    ("unknown", "task.schema=trivia is unknown"),
    ("summarization", "task.schema=scrolls_gov_report is a summarization set"),
    ("no_data", "task.schema=triviaqa names the fields of your data, but no data is given"),
])
def test_wrong_schema_or_missing_field_is_one_sentence_and_exit_2(tmp_path, capsys, case, phrase):
    d = tmp_path / "data"
    rows = {"wrong_schema": hotpotqa_rows(4, 0), "missing_field": qasper_rows(2, 0)}.get(case, triviaqa_rows(4, 0))
    if case == "missing_field":
        del rows[1]["abstract"]
    _jsonl(d / "train.jsonl", rows)
    schema = {"wrong_schema": "triviaqa", "missing_field": "qasper", "wrong_task": "quality", "unknown": "trivia",
              "summarization": "scrolls_gov_report", "no_data": "triviaqa"}[case]
    args = [f"task.schema={schema}"] + ([] if case == "no_data" else [f"task.dataset={d}"])
    code, err = _finetune(capsys, "qa", tmp_path, *args)
    assert code == 2 and phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_save_to_disk_folder_without_datasets_names_the_package(tmp_path, capsys, monkeypatch):
    import datasets
    datasets.Dataset.from_list(_squad_rows(4)).save_to_disk(str(tmp_path / "disk"))
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "datasets", None)
    code, err = _finetune(capsys, "qa", tmp_path, f"task.dataset={tmp_path / 'disk'}")
    assert code == 2 and "needs the 'datasets' package" in err and "longctx-toolkit" in err, err
    assert len(err.strip().splitlines()) == 1


# ---- through `longctx finetune`: the right task, trained and scored -----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task, schema", [("qa", "triviaqa"), ("multiple_choice", "quality"),
                                          ("classification", "scrolls_contract_nli")])
def test_each_kind_of_schema_finetunes_end_to_end(tmp_path, capsys, task, schema):
    d = tmp_path / "data"
    make = {"triviaqa": lambda n, s: triviaqa_rows(n, s), "quality": quality_rows,
            "scrolls_contract_nli": lambda n, s: scrolls_rows("contract_nli", n, s)}[schema]
    for s, seed in (("train", 0), ("validation", 1), ("test", 2)):
        _jsonl(d / f"{s}.jsonl", make(6, seed))
    code, err = _finetune(capsys, task, tmp_path, f"task.dataset={d}", f"task.schema={schema}")
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    m = res["primary_metric"]
    assert res["task"] == task and res["test"]["examples"] == 6
    assert res["test"][f"{m}_ci"][0] <= res["test"][m] <= res["test"][f"{m}_ci"][1]
