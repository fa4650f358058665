"""qa_describe: "what does function X do?" over the default corpus, answered by its first sentence."""
import re

import pytest

from longctx.tasks.builtin import corpus_splits
from longctx.train.finetune import finetune_config, task_class
from longctx.tasks.qa import QATask, check_record
from longctx.tasks.qa_describe import definitions, describe_records

PAGE = """Python Library Documentation: module demo

FUNCTIONS
    dumps(obj, *, indent=None)
        Serialize ``obj`` to a JSON formatted ``str``
        with the given indent.

        Longer text. Call it as
        helper(x)
            which is not a signature.

    loads(s)
        Deserialize a string.

    count(...)
        D.count(value) -> integer -- return number of occurrences of value

    __repr__(self, /)
        Return repr(self).

CLASSES
    class A(builtins.object)
     |  append(self, x)
     |      Add an element to the right side
     |      of the deque.
     |
     |  nodoc(self)
     |
     |  short(self)
     |      Too short.
    class B(A)
     |  append(self, x)
     |      Add an element to the right side
     |      of the deque.
"""


def test_definitions_take_the_first_sentence_of_each_public_described_function():
    found = [(name, PAGE[a:b]) for name, sig, a, b in definitions(PAGE, min_words=3, max_chars=200)]
    assert found == [
        ("dumps", "Serialize ``obj`` to a JSON formatted ``str``\n        with the given indent."),
        ("loads", "Deserialize a string."),
        ("append", "Add an element to the right side\n     |      of the deque."),
    ]  # not: helper (inside a docstring), count (opens with a signature), __repr__, nodoc, short, B's copy
    for name, sig, a, b in definitions(PAGE, 3, 200):
        assert PAGE[sig:].startswith(name + "(")
    assert [n for n, *_ in definitions(PAGE, 3, 60)] == ["loads", "append"]  # max_chars: dumps is 76


@pytest.fixture(scope="module")
def splits():
    docs = corpus_splits(0)
    return docs, {s: describe_records(docs[s], 500, 0.5, seed=i) for i, s in enumerate(("train", "dev", "test"))}


def test_records_are_valid_squad_with_a_sentence_answer_far_in_the_context(splits):
    _, recs = splits
    assert len(recs["train"]) > 2000 and len(recs["dev"]) > 50 and len(recs["test"]) > 50
    for r in (r for s in recs.values() for r in s):
        check_record(r, r["id"])  # answer_start points at the answer text
        ctx, ans, start = r["context"], r["answers"]["text"][0], r["answers"]["answer_start"][0]
        assert len(ctx) <= 500 and ctx[start:start + len(ans)] == ans
        assert len(ans.split()) >= 3 and ans[-1] in ".!?" and ctx.count(ans) == 1
        sig = [m.start() for m in re.finditer(rf"^[ |]*{re.escape(r['question'])}\(", ctx, re.M)]
        assert len(sig) == 1 and sig[0] < start  # the name is defined once, just before its description
        assert ctx.index(r["question"] + "(", sig[0]) >= 0.5 * 500  # the definition in the far half


def test_splits_share_no_module_and_follow_the_document_split(splits):
    docs, recs = splits
    mods = {s: {r["doc"] for r in recs[s]} for s in recs}
    assert not (mods["train"] & mods["dev"]) and not (mods["train"] & mods["test"]) and not (mods["dev"] & mods["test"])
    for s in recs:
        assert mods[s] <= {d["id"] for d in docs[s]}


def test_the_records_are_deterministic_for_a_seed(splits):
    docs, recs = splits
    assert describe_records(docs["dev"], 500, 0.5, seed=1) == recs["dev"]
    assert describe_records(docs["dev"], 500, 0.5, seed=7) != recs["dev"]  # the contexts move with the seed


def test_qa_describe_is_a_registered_qa_task_with_its_own_records():
    cfg = finetune_config("qa_describe", {}, ["task.context_chars=500", "data.seq_len=128", "model.window=4"])
    task = task_class("qa_describe")(cfg)
    assert isinstance(task, QATask) and task.name == "qa_describe"
    splits = task.load_splits()
    assert splits["dev"] == describe_records(corpus_splits(cfg["seed"])["dev"], 500, 0.5, cfg["seed"] + 1)
