"""Experiment configs: every declared key refuses a wrong-typed value with one sentence and exit 2, the
user errors of issue 11 item 14 are refused before anything is written, `longctx config show` lists
every key, and the public functions keep their contracts.

Nothing here trains: a config is refused (or accepted) before any data is read, so each case takes
milliseconds. The wrong value for a key is chosen from its declared type by this file's own rule
(``_wrong_value``), not by the code under test.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.train import config as C


def _members(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _wrong_value(annotation):
    """A value of a Python type the declaration does not accept (the first of a word, an int, a
    float, a bool, a list, a mapping); a list where a Literal of strings is expected."""
    if typing.get_origin(annotation) is typing.Literal:
        return ["not", "a", "choice"]
    accepted = set()
    for m in _members(annotation):
        origin = typing.get_origin(m) or m
        accepted.add(dict if dataclasses.is_dataclass(origin) else origin)
        if origin is typing.Literal:
            accepted.add(str)
        if origin is float:
            accepted.add(int)  # an int is a valid float
    for value in ("not-a-value", 12345, 1.5, True, [1, 2], {"x": {"y": 1}}):
        if type(value) not in accepted:
            return value
    raise AssertionError(f"{annotation} accepts everything")


def _keys():
    """(dotted key for an override, declared Key) for every key a user can set directly."""
    out = []
    for k in C.all_keys():
        if k.path.startswith("stages"):
            continue  # phases are list items: covered by test_every_stage_key_refuses_a_wrong_type
        out.append(k)
    return out


def _yaml(value) -> str:
    import json
    return json.dumps(value)


BASE = ["data.tokenizer=bytes", "data.seq_len=64", "model.window=8", "model.max_position_embeddings=64"]


def _refused(capsys, argv, tmp_path) -> str:
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists(), "a refused config must not create the run folder"
    return err


def test_every_key_is_declared_with_a_type_and_help():
    keys = C.all_keys()
    paths = [k.path for k in keys]
    assert len(paths) == len(set(paths))
    from longctx.models.config import LongctxConfig
    import inspect
    fields = set(inspect.signature(LongctxConfig.__init__).parameters) - {"self", "kwargs"}
    assert {p.split(".", 1)[1] for p in paths if p.startswith("model.")} >= fields
    for section in ("data", "train"):
        assert {p.split(".", 1)[1] for p in paths if p.startswith(section + ".") and p.count(".") == 1} == \
            set(C.DEFAULTS[section])
    for k in keys:
        assert k.help, k.path


@pytest.mark.parametrize("k", _keys(), ids=lambda k: k.path)
def test_every_key_refuses_a_wrong_type_with_one_sentence(k, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    wrong = _wrong_value(k.annotation)
    override = f"{k.path}={_yaml(wrong)}"
    if k.path.startswith("data.tokenizer."):  # a key of the tokenizer spec: the spec is one value
        override = "data.tokenizer=" + _yaml({"train": "bpe", k.path.rsplit(".", 1)[1]: wrong})
    err = _refused(capsys, [*BASE, override], tmp_path)
    assert f"'{k.path}'" in err, err


@pytest.mark.parametrize("k", _keys(), ids=lambda k: k.path)
def test_every_key_accepts_its_default(k):
    """The other side of the parametrised refusal: the declared default passes the checks (no key is
    refused whatever its value)."""
    if k.required:
        pytest.skip("no default")
    parts = k.path.split(".")
    tree: dict = {}
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = k.default
    if parts[0] == "data" and parts[1] == "tokenizer" and len(parts) == 3:
        node["train"] = "bpe"
    C.merge(C.DEFAULTS, tree)


@pytest.mark.parametrize("stage_key", [k for k in dataclasses.fields(C.Stage)], ids=lambda f: f.name)
def test_every_stage_key_refuses_a_wrong_type(stage_key, tmp_path, capsys):
    hints = typing.get_type_hints(C.Stage)
    phase = {"steps": 2, stage_key.name: _wrong_value(hints[stage_key.name])}
    err = _refused(capsys, [*BASE, f"stages={_yaml([phase])}"], tmp_path)
    assert f"'stages[0].{stage_key.name}'" in err
    hints = typing.get_type_hints(C.StagePreset)
    for name, ann in hints.items():
        preset = {"preset": "double", name: _wrong_value(ann)}
        err = _refused(capsys, [*BASE, f"stages={_yaml(preset)}"], tmp_path)
        assert f"'stages.{name}'" in err


# issue 11 item 14: each was a traceback or silently accepted
@pytest.mark.parametrize("override,message", [
    ("model.window=abc", "'model.window' expects int | list[int], got 'abc'"),
    ("model.window=8.5", "'model.window' expects int | list[int], got 8.5"),
    ("model.hidden_act=foo", "'model.hidden_act' must be one of gelu"),
    ("model.num_hidden_layers=two", "'model.num_hidden_layers' expects int"),
    ("model.hidden_dropout_prob=1.5", "'model.hidden_dropout_prob' must be < 1"),
    ("model.causal=maybe", "'model.causal' expects bool"),
    ("model.num_attention_heads=3", "heads do not divide hidden_size"),
    ("model.window=[4,8,16]", "per-layer list needs 2 values"),
    ("train.log_every=0", "'train.log_every' must be >= 1, got 0"),
    ("train.save_every=-1", "'train.save_every' must be >= 0, got -1"),
    ("stages=[{steps: -5}]", "'stages[0].steps' must be >= 1, got -5"),
    ("stages=[{steps: 3, sequence: 64}]", "unknown config key 'stages[0].sequence'"),
    ("stages={preset: double, phases: 0}", "'stages.phases' must be >= 1, got 0"),
    ("stages={preset: triple}", "'stages.preset' must be one of double"),
    ("data.tokenizer={train: bpe, vocab_size: -10}", "'data.tokenizer.vocab_size' must be >= 1, got -10"),
    ("data.tokenizer={train: sentencepiece}", "'data.tokenizer.train' must be one of bpe, wordpiece"),
    ("init_from=5", "'init_from' expects str | null, got 5"),
    ("train.bf16=1", "'train.bf16' expects bool, got 1"),
    ("train=5", "'train' must be a mapping"),
    ("train.steps.x=1", "'train.steps' expects int, got {'x': 1}"),
])
def test_user_errors_are_one_sentence_and_nothing_is_written(override, message, tmp_path, capsys):
    err = _refused(capsys, [*BASE, "model.num_hidden_layers=2", override], tmp_path)
    assert message in err, err


def test_init_from_a_folder_without_a_longctx_model_is_refused_before_the_run(tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    err = _refused(capsys, [*BASE, f"init_from={bert}"], tmp_path)
    assert "holds a 'bert' model, not a longctx model" in err


def test_non_utf8_yaml_is_one_sentence(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    err = _refused(capsys, ["--config", str(cfg)], tmp_path)
    assert "is not UTF-8 text" in err and str(cfg) in err


def test_a_yaml_float_without_a_dot_is_a_float():
    """YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it means."""
    cfg = C.resolve({"train": {"lr": "1e-3"}}, ["train.weight_decay=2e-2", "train.clip=1"])
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["weight_decay"] == 0.02
    assert isinstance(cfg["train"]["clip"], float)
    with pytest.raises(LongctxError, match="'train.lr' expects float"):
        C.resolve({"train": {"lr": "fast"}})


def test_resolve_keeps_the_plain_dict_contract():
    cfg = C.resolve({"model": {"window": [4, 8]}, "data": {"seq_len": 64}},
                    ["stages={preset: double, phases: 2}", "model.max_position_embeddings=256"])
    assert cfg["model"]["window"] == [4, 8] and cfg["model"]["hidden_size"] == C.DEFAULTS["model"]["hidden_size"]
    assert cfg["data"]["tokenizer"] == {"train": "bpe", "vocab_size": 8192}
    assert C.stage_list(cfg) == [{"steps": 50, "seq_len": 64, "window": 4, "lr": 1e-3},
                                 {"steps": 50, "seq_len": 128, "window": 8, "lr": 5e-4}]
    phases = C.resolve({"data": {"seq_len": 64}, "stages": [{"steps": 3}, {"steps": 2, "seq_len": 128, "lr": 1e-4}],
                        "model": {"max_position_embeddings": 128, "window": 8}})
    assert C.stage_list(phases) == [{"steps": 3, "seq_len": 64, "window": 8, "lr": 1e-3},
                                    {"steps": 2, "seq_len": 128, "window": 8, "lr": 1e-4}]
    # merge: sections key by key, a tokenizer spec replaced whole
    merged = C.merge(C.DEFAULTS, {"data": {"tokenizer": "bytes"}, "train": {"steps": 7}})
    assert merged["data"]["tokenizer"] == "bytes" and merged["data"]["seq_len"] == 2048
    assert merged["train"]["steps"] == 7 and merged["train"]["lr"] == 1e-3
    assert C.DEFAULTS["train"]["steps"] == 100  # DEFAULTS is never modified
    assert C.parse_overrides(["a.b=1", "a.c=[1, 2]", "d="]) == {"a": {"b": 1, "c": [1, 2]}, "d": ""}


def test_config_show_lists_every_key_with_type_default_and_help(capsys):
    assert main(["config", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split()[0]: line for line in lines}
    for k in C.all_keys():
        assert k.path in by_key, k.path
        assert k.help in by_key[k.path]
    assert "int (>= 1)" in by_key["train.steps"] and " 100 " in by_key["train.steps"]
    assert "int | list[int]" in by_key["model.window"] and "one-sided" in by_key["model.window"]
    assert main(["config", "show", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| key | type | default | help |") and "| `" not in md


def test_config_show_resolves_a_config(tmp_path, capsys):
    import yaml
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 7\n")
    assert main(["config", "show", "--config", str(cfg), "data.seq_len=256", "model.window=16"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 7 and shown["data"]["seq_len"] == 256 and shown["model"]["window"] == 16
    assert main(["config", "show", "train.steps=0"]) == 2
    assert "'train.steps' must be >= 1" in capsys.readouterr().err


def test_packaged_and_example_configs_resolve():
    """Every config shipped (configs/*.yaml, the default comparison) still passes the typed checks."""
    from longctx.experiments.compare import default_config_path, load_comparison

    load_comparison(None, [])
    root = Path(__file__).resolve().parent.parent / "configs"
    for f in sorted(root.glob("*.yaml")):
        raw = C.load_yaml(f)
        if "variants" in raw:
            load_comparison(f, [])
        else:
            C.resolve(raw)
    assert default_config_path().is_file()


def test_bench_takes_attention_window_and_refuses_the_old_window(tmp_path, capsys):
    """One meaning of `window` (one-sided): the benchmarks' two-sided size is `attention_window`; the
    old key and flag are refused with a hint, before anything runs."""
    old = tmp_path / "old.yaml"
    old.write_text("window: 512\n")
    for argv in (["bench", "attention", "--config", str(old)], ["bench", "train", "--window", "64"],
                 ["bench", "attention", "--window", "64"]):
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "attention_window" in err.replace("-", "_"), err
    assert not (tmp_path / "out").exists()
    from longctx.bench import attention, train
    assert "attention_window" in attention.DEFAULTS and "window" not in attention.DEFAULTS
    assert "attention_window" in train.DEFAULTS and "window" not in train.DEFAULTS


def test_numbers_in_scientific_notation_are_numbers_in_overrides_and_files(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; configs and overrides read it as 0.001."""
    assert C.parse_overrides(["train.lr=1e-3", "finetune.qa.lr=[1e-3, 3E-4]", "data.corpus=1e3x"]) == {
        "train": {"lr": 0.001}, "finetune": {"qa": {"lr": [0.001, 0.0003]}}, "data": {"corpus": "1e3x"}}
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 2e-4\n")
    assert C.resolve(C.load_yaml(f))["train"]["lr"] == 0.0002


def _comparison_listing(capsys, *args) -> dict[str, list[str]]:
    """`config show --config COMPARISON`: {key: [type, value, help]} (columns split on two spaces)."""
    import re
    assert main(["config", "show", *args]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith("#"):
            key, kind, value, help_ = re.split(r"\s{2,}", line, maxsplit=3)
            out[key] = [kind, value, help_]
    return out


def test_config_show_lists_a_comparisons_keys(capsys):
    """Issue 30: a comparison config (``variants:``) is listed key by key under the names `longctx compare`
    overrides use: its own keys, the base keys with the values it gives them, each finetuning task's keys
    and the task's own ``task.*`` options (set ones and defaults)."""
    import json

    from longctx.experiments.compare import default_config_path
    from longctx.tasks.common import COMMON_OPTIONS
    from longctx.train.finetune import task_class

    rows = _comparison_listing(capsys, "--config", str(default_config_path()))
    value = {k: json.loads(v[1]) for k, v in rows.items() if not k.startswith("variants.") and v[1] != "-"}
    assert value["seeds"] == [0, 1, 2, 3, 4] and value["reference"] == "sliding-global" and value["jobs"] == 2
    # base keys: the comparison's values, not the defaults (train.steps 100, hidden_size 128)
    assert value["train.steps"] == 150 and value["model.hidden_size"] == 64 and value["data.seq_len"] == 256
    assert value["train.log_every"] == 25 and value["model.window"] == 16
    assert "set by the variants" in rows["model.attention"][2] and "blocks" in rows["model.attention"][2]
    assert "set by the variants" not in rows["train.lr"][2]
    assert rows["variants.linformer"][1] == 'model.attention={"type": "linformer", "k": 64}, task.global_tokens="none"'
    # finetune.<task>.*: the comparison's own keys, the sections and every task option
    assert value["finetune.qa.lr"] == [1.0e-3, 3.0e-3] and value["finetune.qa.grid_seeds"] == 1
    assert value["finetune.qa.train.steps"] == 400 and value["finetune.qa.data.seq_len"] == 128
    assert value["finetune.qa.train.log_every"] == 10  # not set: the default
    for task in ("qa", "listops"):
        for option, default in {**COMMON_OPTIONS, **task_class(task).OPTIONS}.items():
            assert f"finetune.{task}.task.{option}" in rows, (task, option)
    assert value["finetune.qa.task.context_chars"] == 500  # set by the comparison (QA's default: 6000)
    assert value["finetune.qa.task.far_fraction"] == 0.5  # QA's default, not set
    assert value["finetune.qa.task.global_tokens"] == "question" and "sliding" in rows["finetune.qa.task.global_tokens"][2]
    assert value["finetune.listops.task.max_depth"] == 3 and value["finetune.listops.task.global_tokens"] == "first"
    assert value["finetune.listops.model.max_position_embeddings"] == 512
    assert rows["finetune.qa.task.doc_stride"][0] == "int" and rows["finetune.qa.task.doc_stride"][2]  # typed, helped
    assert "name" in rows and value["name"] == "default"  # the comparison's name, not base's "run"


def test_config_show_comparison_takes_overrides_and_every_shipped_comparison(capsys):
    root = Path(__file__).resolve().parent.parent / "configs"
    rows = _comparison_listing(capsys, "--config", str(root / "structformer.yaml"), "seeds=2", "train.steps=9",
                               "finetune.section_heading.task.context_chars=900")
    assert rows["seeds"][1] == "[0, 1]" and rows["train.steps"][1] == "9"
    assert rows["finetune.section_heading.task.context_chars"][1] == "900"
    assert rows["finetune.section_heading.task.heading_global"][0] == "str | bool"
    assert "text-only+ft-headings: true" in rows["finetune.section_heading.task.heading_global"][2]
    assert rows["analysis.max_docs"][1] == "16" and rows["data.corpus"][1] == '"texdoc"'
    rows = _comparison_listing(capsys, "--config", str(root / "lex-extrapolation.yaml"))
    assert rows["objective"][1] == '"clm"' and rows["extrapolation.tokens"][1] == "1024"
    assert rows["extrapolation.multiples"][1] == "[1, 2, 4, 8]" and not any(k.startswith("finetune.") for k in rows)
    rows = _comparison_listing(capsys, "--config", str(root / "compute-blocks-vs-longformer.yaml"))
    assert rows["compute.flops"][1] == "[500000000000.0, 1000000000000.0]"
    assert sorted(k for k in rows if k.startswith("variants.")) == ["variants.blocks", "variants.sliding-global"]
    assert rows["reference"][1] == '"sliding-global"'
    # a listed key is an override `longctx compare` takes, and the listing shows what it set
    from longctx.experiments.compare import load_comparison
    comp = load_comparison(root / "compute-blocks-vs-longformer.yaml", ["finetune.qa.task.max_chunks=77"])
    assert comp["finetune"]["qa"]["task"]["max_chunks"] == 77
    assert main(["config", "show", "--config", str(root / "structformer.yaml"), "seeds=0"]) == 2  # checked as compare
    assert "seeds" in capsys.readouterr().err


def test_overrides_merge_into_mappings_at_every_depth_unless_they_name_another_type():
    cfg = C.resolve({"data": {"tokenizer": {"train": "wordpiece", "vocab_size": 4096}, "seq_len": 64},
                     "stages": {"preset": "double", "phases": 2, "steps": 40},
                     "model": {"attention": {"type": "bigbird", "block": 8, "random": 1}, "max_position_embeddings": 128}},
                    ["data.tokenizer.vocab_size=1024", "stages.steps=5", "model.attention.random=2"])
    assert cfg["data"]["tokenizer"] == {"train": "wordpiece", "vocab_size": 1024}
    assert C.stage_list(cfg)[0]["steps"] == 5 and len(C.stage_list(cfg)) == 2
    assert cfg["model"]["attention"] == {"type": "bigbird", "block": 8, "random": 2}
    other = C.resolve({"model": {"attention": {"type": "bigbird", "block": 8, "random": 1}}},
                      ["model.attention={type: sliding, window: 4}"])
    assert other["model"]["attention"] == {"type": "sliding", "window": 4}  # not bigbird's block and random
    assert C.resolve({"data": {"tokenizer": {"train": "bpe", "vocab_size": 512}}},
                     ["data.tokenizer=bytes"])["data"]["tokenizer"] == "bytes"
