"""RULER-style synthetic tasks: valid SQuAD records whose label a rule recovers from the text, needles at
the requested depth, exact lengths, seeded and split-disjoint; the depth x length breakdown and heatmap."""
import random
import re
from collections import Counter

import numpy as np
import pytest

from longctx.errors import LongctxError
from longctx.tasks.builtin import corpus_splits
from longctx.train.finetune import RULER_NAMES, TASK_NAMES, finetune_config, task_class
from longctx.tasks.qa import QATask, check_record
from longctx.tasks.ruler import NOISE, Source, depth_length_heatmap, fit, generate, place

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _task(name, *overrides):
    cfg = finetune_config(name, {}, ["task.train_size=40", "task.dev_size=30", "task.test_size=30",
                                     "task.length=[800,1500]", f"task.depth={DEPTHS}", *overrides])
    return task_class(name)(cfg)


# ---- the rules that recover each task's label from the text alone ----

def _oracle(name, r):
    ctx, q = r["context"], r["question"]
    if name.startswith("ruler_niah"):
        key = re.search(r"for (\w+)\?$", q).group(1)
        return {v for k, v in re.findall(r"special magic numbers for (\w+) is: (\d+)\.", ctx) if k == key}
    if name == "ruler_vt":
        assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", ctx))
        x = re.search(r"VAR ([A-Z]{5})\?$", q).group(1)
        while not x.isdigit():
            x = assign[x]
        return {x}
    if name in ("ruler_cwe", "ruler_fwe"):
        counts = Counter(re.findall(r"\d+\. ([a-z]+)" if name == "ruler_cwe" else r"[a-z]+", ctx))
        top = counts.most_common(1)[0][1]
        return {w for w, c in counts.items() if c == top}
    # ruler_qa: the sentence after the one signature line of the asked name
    sig = [m.end() for m in re.finditer(rf"^[ |]*{re.escape(q)}\(.*$", ctx, re.M)]
    assert len(sig) == 1
    start = re.compile(r"[^ |\n]").search(ctx, sig[0] + 1).start()
    return {a for a, s in zip(r["answers"]["text"], r["answers"]["answer_start"]) if s == start}


def _requested_depth(r):
    """The depth the schedule asked for this record's draw (its first record: the target)."""
    i, q = map(int, r["id"].split(":")[-2:])
    return DEPTHS[(i // 2) % len(DEPTHS)] if q == 0 else None


def _tolerance(r, haystack):
    """A needle lands at the unit start nearest the request (a sentence, a line, a definition): within the
    longest unit, over the haystack (the context less its needles: at most 300 characters here)."""
    unit = max(map(len, NOISE)) if haystack == "noise" else max(map(len, r["context"].split(
        "\n\n" if haystack == "qa" else "\n")))
    return (unit + 2) / (r["length"] - 300)


def test_the_eight_tasks_are_registered_qa_tasks_a_comparison_can_list():
    from longctx.experiments.downstream import check_spec

    assert set(RULER_NAMES) <= set(TASK_NAMES) and len(RULER_NAMES) == 8
    check_spec({name: {"task": {"length": [1000, 2000]}} for name in RULER_NAMES})
    for name in RULER_NAMES:
        task = _task(name)
        assert isinstance(task, QATask) and task.name == name


@pytest.mark.slow
@pytest.mark.parametrize("name", RULER_NAMES)
@pytest.mark.parametrize("haystack", ["noise", "corpus"])
def test_records_are_valid_exact_length_labelled_by_rule_and_at_the_requested_depth(name, haystack):
    splits = _task(name, f"task.haystack={haystack}").load_splits()
    for r in (r for s in splits.values() for r in s):
        check_record(r, r["id"])  # every answer_start points at its answer
        assert len(r["context"]) == r["length"] in (800, 1500)
        gold = set(r["answers"]["text"])
        assert _oracle(name, r) == gold, (r["question"], gold)
        for a in gold:
            assert re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", r["context"])
        want = _requested_depth(r)
        if name not in ("ruler_cwe", "ruler_fwe") and want is not None:  # word lists have no needle
            kind = "qa" if name == "ruler_qa" else haystack
            assert abs(r["depth"] - want) <= _tolerance(r, kind), (r["depth"], want)
    assert {_requested_depth(r) for r in splits["train"]} >= set(DEPTHS)  # the sweep covers every depth


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ruler_niah_single", "ruler_niah_multikey", "ruler_niah_multivalue",
                                  "ruler_niah_multiquery", "ruler_vt"])
def test_the_label_is_right_for_a_thousand_draws(name):
    task = _task(name, "task.haystack=noise", "task.length=400")
    src = Source(task.opts, [], len)
    recs = generate(type(task).draw, src, 1000, "thousand")
    for r in recs:
        assert _oracle(name, r) == set(r["answers"]["text"])
        check_record(r, r["id"])


def test_multivalue_lists_every_value_and_multiquery_gives_one_record_per_asked_key():
    mv = _task("ruler_niah_multivalue", "task.num_values=3").load_splits()["dev"][0]
    assert len(mv["answers"]["text"]) == 3 and len(set(mv["answers"]["text"])) == 3
    mq = _task("ruler_niah_multiquery", "task.num_keys=5", "task.num_queries=3").load_splits()["dev"]
    first = [r for r in mq if r["context"] == mq[0]["context"]]
    assert len(first) == 3 and len({r["question"] for r in first}) == 3
    assert len(re.findall("special magic numbers", mq[0]["context"])) == 5
    with pytest.raises(LongctxError, match="num_queries"):
        _task("ruler_niah_multiquery", "task.num_keys=2", "task.num_queries=3").load_splits()


def test_the_records_are_deterministic_for_a_seed_and_the_splits_disjoint():
    a = _task("ruler_niah_multikey").load_splits()
    assert _task("ruler_niah_multikey").load_splits() == a
    assert _task("ruler_niah_multikey", "data.seed=7").load_splits()["dev"] != a["dev"]
    ctx = {s: {r["context"] for r in a[s]} for s in a}
    docs = {s: {d for r in a[s] for d in r["doc"]} for s in a}
    split_docs = {s: {d["id"] for d in v} for s, v in corpus_splits(_task("ruler_niah_multikey").cfg["seed"]).items()}
    for s, t in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not ctx[s] & ctx[t] and not docs[s] & docs[t]
    for s in a:
        assert docs[s] and docs[s] <= split_docs[s]  # haystacks come from the split's own pages
    noise = {s: {r["context"] for r in v} for s, v in _task("ruler_vt", "task.haystack=noise").load_splits().items()}
    assert not noise["train"] & noise["dev"] and not noise["dev"] & noise["test"]


def test_a_length_in_tokens_is_the_longest_context_with_at_most_that_many():
    task = _task("ruler_niah_single", "task.length_unit=tokens", "task.length=[100,300]", "data.tokenizer=bytes")
    tok = task.make_tokenizer()
    for r in task.load_splits()["dev"]:
        n = len(tok.encode(r["context"])[0])
        assert r["length"] - 2 <= n <= r["length"]
    words = lambda t: len(t.split())  # noqa: E731  any monotone measure
    ctx, starts, _ = fit(lambda n: place(["aa bb"] * 400, " ", [(0.5, "the needle")], n), 57, words, 2000)
    assert words(ctx) == 57 and ctx[starts[0]:].startswith("the needle")


def test_place_puts_needles_at_unit_starts_at_their_depth():
    units = [f"s{i:03d}." for i in range(100)]  # 5 characters each, a space between: 600 characters
    ctx, starts, depths = place(units, " ", [(1.0, "END"), (0.0, "BEGIN"), (0.5, "MID")], 600)
    assert ctx.startswith("BEGIN s000.") and ctx.endswith("END s099.") and "s049. MID s050." in ctx
    assert [ctx[s:s + 3] for s in starts] == ["END", "BEG", "MID"] and depths == [0.99, 0.0, 0.5]
    assert len(ctx) == 599 + len("END BEGIN MID ")  # the haystack's n characters (its last space cut)


def test_wrong_options_are_one_sentence():
    for bad in (["task.haystack=web"], ["task.length_unit=words"], ["task.depth=1.5"], ["task.length=[0]"],
                ["task.depth=[a]"]):
        with pytest.raises(LongctxError):
            _task("ruler_niah_single", *bad).load_splits()


def _evaluation(task):
    """The task's score with predictions right at the first two depths and wrong beyond."""
    task.splits = task.load_splits()
    recs = task.splits["dev"]
    task.predictions = lambda split, feats, outs: [r["answers"]["text"][0] if r["depth"] < 0.4 else "wrong"
                                                   for r in recs]
    return task.score("dev", [], []), recs


def test_the_evaluation_breaks_exact_match_down_by_depth_and_by_length():
    ev, recs = _evaluation(_task("ruler_niah_single", "task.haystack=noise", "task.bootstrap=20"))
    assert ev["exact_match"] == pytest.approx(np.mean([r["depth"] < 0.4 for r in recs]))
    assert set(ev["by_depth"]) == {"0.00-0.20", "0.20-0.40", "0.40-0.60", "0.60-0.80", "0.80-1.00"}
    assert [ev["by_depth"][k]["exact_match"] for k in sorted(ev["by_depth"])] == [1, 1, 0, 0, 0]
    assert sum(v["examples"] for v in ev["by_depth"].values()) == len(recs)
    assert set(ev["by_length"]) == {"800", "1500"} and ev["by_length"]["800"]["examples"] == 15
    assert len(ev["per_example_depth"]) == len(ev["per_example_length"]) == len(ev["per_example"]) == len(recs)


def test_the_heatmap_png_has_depth_rows_and_length_columns(tmp_path, monkeypatch):
    import matplotlib.image

    from longctx import plots

    drawn = {}
    real = plots.heatmap_figure
    monkeypatch.setattr(plots, "heatmap_figure", lambda *a, **k: drawn.update(args=a) or real(*a, **k))
    ev, recs = _evaluation(_task("ruler_niah_single", "task.haystack=noise", "task.bootstrap=20"))
    m = depth_length_heatmap(tmp_path / "h.png", ev, depth_bins=5)
    _, values, rows, cols, xlabel, ylabel = drawn["args"]
    assert (rows, cols, xlabel, ylabel) == (["0.00-0.20", "0.20-0.40", "0.40-0.60", "0.60-0.80", "0.80-1.00"],
                                           ["800", "1500"], "context length", "needle depth")
    assert m.shape == (5, 2) and np.array_equal(m, values)
    assert np.array_equal(m[:2], np.ones((2, 2))) and np.array_equal(m[2:], np.zeros((3, 2)))
    img = matplotlib.image.imread(tmp_path / "h.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically
    with pytest.raises(LongctxError, match="RULER"):
        depth_length_heatmap(tmp_path / "x.png", {"f1": 0.5})


@pytest.mark.slow
def test_niah_single_is_learned_by_a_tiny_model_above_its_untrained_self(tmp_path):
    """Niah single in a noise haystack of 240 characters (about 87 tokens), a 2-layer model, 100 steps:
    exact match on dev, paired with the same model untrained (measured: 0.32 against 0.00)."""
    import torch

    from longctx.train.finetune import run_finetune

    cfg = finetune_config("ruler_niah_single", {}, [
        "task.haystack=noise", "task.length=240", "task.doc_stride=32", "task.max_question_tokens=24", "task.train_size=1600", "task.dev_size=100", "task.test_size=100",
        "data.seq_len=128", "model.window=8", "model.hidden_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.max_position_embeddings=128", "train.batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=10", "train.steps=100", "train.save_every=0", "train.eval_every=0", "task.bootstrap=200"])
    task = task_class("ruler_niah_single")(cfg)
    task.prepare()
    torch.manual_seed(0)
    untrained = task.evaluate(task.build_model(), "dev")
    trained = run_finetune(cfg, "ruler_niah_single", tmp_path / "run", progress=False)["eval"]
    diff = np.array(trained["per_example_exact_match"]) - np.array(untrained["per_example_exact_match"])
    assert diff.mean() > 0.15 and (diff > 0).sum() > 5 * max(1, (diff < 0).sum()), (trained, untrained)


def test_a_comparison_draws_a_depth_length_heatmap_for_every_ruler_task(tmp_path):
    """report.ruler_heatmaps: one PNG per ruler_* task and variant from the chosen runs' test evaluations
    (pooled over seeds); other tasks and runs of another learning rate are not drawn."""
    import json as _json
    from longctx.experiments.report import ruler_heatmaps

    def run(name, em):
        d = tmp_path / name
        d.mkdir()
        test = {"per_example_depth": [0.1, 0.5, 0.9, 0.1], "per_example_length": [100, 100, 200, 200],
                "per_example_exact_match": em}
        (d / "results.json").write_text(_json.dumps({"test": test}))
        (d / "run_config.json").write_text(_json.dumps({"task": {"depth_bins": 2}}))
        return str(d)

    results = [{"variant": "sliding", "finetune": {
        "ruler_niah_single": {"runs": [{"lr": 1e-3, "dir": run("a", [1, 0, 1, 1]), "test": 0.75},
                                       {"lr": 1e-3, "dir": run("b", [1, 1, 0, 1]), "test": 0.75},
                                       {"lr": 1e-4, "dir": run("c", [0, 0, 0, 0])}]},
        "qa": {"runs": [{"lr": 1e-3, "dir": run("d", [0, 0, 0, 0]), "test": 0.0}]}}}]
    paths = ruler_heatmaps(results, tmp_path)
    assert [p.name for p in paths] == ["ruler_niah_single_sliding.png"] and paths[0].stat().st_size > 1000


def test_the_ruler_recipe_is_the_default_comparison_plus_ruler_tasks():
    """configs/ruler-vs-lra.yaml reuses the default run's folders only while it asks for the same runs."""
    from pathlib import Path

    from longctx.experiments.compare import default_config_path
    from longctx.experiments.downstream import expand_ruler
    from longctx.io import load_yaml
    recipe = load_yaml(Path(__file__).parents[1] / "configs" / "ruler-vs-lra.yaml")
    default = load_yaml(default_config_path())
    assert {k: v for k, v in recipe.items() if k != "finetune"} == {k: v for k, v in default.items() if k != "finetune"}
    finetune = expand_ruler(recipe["finetune"])
    assert {k: finetune[k] for k in default["finetune"]} == default["finetune"]
    assert sorted(set(finetune) - set(default["finetune"])) == ["ruler_niah_single", "ruler_vt"]


# the RULER entries of configs/ruler-vs-lra.yaml as they were written out before its ruler: group
WRITTEN_OUT = {
    "ruler_niah_single": {
        "data": {"seq_len": 128},
        "train": {"steps": 150, "batch_size": 16, "lr": 0.003, "warmup_steps": 15, "save_every": 0, "eval_batches": 1},
        "task": {"length": [400, 800], "train_size": 1000, "dev_size": 100, "test_size": 200, "max_question_tokens": 24,
                 "doc_stride": 32, "bootstrap": 1000}},
    "ruler_vt": {
        "data": {"seq_len": 128},
        "train": {"steps": 150, "batch_size": 16, "lr": 0.003, "warmup_steps": 15, "save_every": 0, "eval_batches": 1},
        "task": {"length": [400, 800], "num_hops": 2, "train_size": 1000, "dev_size": 100, "test_size": 200,
                 "max_question_tokens": 24, "doc_stride": 32, "bootstrap": 1000}}}


def _fingerprints(comp: dict, tmp_path) -> dict:
    """{(variant, run folder): fingerprint} of every finetuning run ``comp`` plans from stand-in pretrained runs."""
    from longctx.experiments import downstream
    from longctx.experiments.runs import Run, fingerprint
    from longctx.models.config import from_run_config

    out = {}
    for v in comp["variants"]:
        pre = []
        for s in comp["seeds"]:
            d = tmp_path / f"{v['name']}-{s}"
            from_run_config(v["config"], vocab_size=8192).save_pretrained(d / "model")  # config.json only
            pre.append(Run({**v["config"], "seed": s}, d, "stand-in"))
        for run in downstream.plan(v, pre, comp["finetune"], v["task_sets"]):
            out[(v["name"], run.dir.relative_to(tmp_path).as_posix())] = fingerprint(run.requested)
    return out


def test_the_ruler_group_asks_for_the_same_runs_as_its_tasks_written_out(tmp_path):
    """finetune.ruler expands into one entry per listed task, shared settings under each task's own: the
    recipe's group and its two entries written out give equal configs and run fingerprints (so the runs are
    reused), in the group's place; overrides reach the group and its tasks; wrong names are one sentence."""
    from pathlib import Path

    import yaml

    from longctx.experiments.compare import load_comparison
    from longctx.experiments.downstream import expand_ruler
    from longctx.io import load_yaml
    path = Path(__file__).parents[1] / "configs" / "ruler-vs-lra.yaml"
    raw = load_yaml(path)
    assert "ruler" in raw["finetune"]
    written = {**{k: v for k, v in raw["finetune"].items() if k != "ruler"}, **WRITTEN_OUT}
    (tmp_path / "written.yaml").write_text(yaml.safe_dump({**raw, "finetune": written}, sort_keys=False))
    few = ["seeds=2"]
    group, plain = load_comparison(path, few), load_comparison(tmp_path / "written.yaml", few)
    assert group["finetune"] == plain["finetune"] and list(group["finetune"]) == list(plain["finetune"])
    a, b = _fingerprints(group, tmp_path / "runs"), _fingerprints(plain, tmp_path / "runs")  # one folder: init_from
    assert a == b and len(a) == 5 * (2 + 2 + 2 * 2)  # per variant: qa (its lr grid on seed 0), listops, 2 RULER x 2 seeds
    # overrides: the group's shared settings, one task's own
    comp = load_comparison(path, [*few, "finetune.ruler.train.steps=7", "finetune.ruler_vt.task.num_hops=3"])
    ft = comp["finetune"]
    assert ft["ruler_niah_single"]["train"]["steps"] == ft["ruler_vt"]["train"]["steps"] == 7
    assert ft["ruler_vt"]["task"]["num_hops"] == 3 and ft["ruler_vt"]["task"]["length"] == [400, 800]
    assert list(ft) == ["qa", "listops", "ruler_niah_single", "ruler_vt"]
    # a list of names, and the errors
    assert expand_ruler({"ruler": {"tasks": ["cwe", "fwe"], "data": {"seq_len": 64}}}) == {
        "ruler_cwe": {"data": {"seq_len": 64}}, "ruler_fwe": {"data": {"seq_len": 64}}}
    for bad, msg in [({"tasks": ["niah"]}, "'niah' is not a RULER task; use niah_single, niah_multikey"),
                     ({"tasks": []}, "needs 'tasks'"), ({"tasks": ["vt", "vt"]}, "distinct"),
                     ({"tasks": ["vt"], "trian": {}}, "unknown keys"), ({"tasks": {"vt": 3}}, "mapping")]:
        with pytest.raises(LongctxError, match=msg) as e:
            expand_ruler({"ruler": bad})
        assert "\n" not in str(e.value)
