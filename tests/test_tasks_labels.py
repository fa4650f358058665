"""Classification files with bad labels or bytes: one sentence naming the file and the row (exit 2),
never a class per NaN, a traceback, or an empty label set."""
import json

import pytest

from longctx.cli import main
from longctx.train.finetune import finetune_config, task_class
from test_tasks import TINY


def _rows(labels):
    return [{"text": f"document {i} " * 5, "label": lab} for i, lab in enumerate(labels)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))  # no progress bar on stderr
    return path


def _refused(tmp_path, capsys, train, dev=None, test=None) -> str:
    """finetune on the files: exit 2 and one line of error, which is returned."""
    dev = dev or _jsonl(tmp_path / "dev.jsonl", _rows(["a", "b"]))
    test = test or _jsonl(tmp_path / "test.jsonl", _rows(["a", "b"]))
    code = main(["finetune", "--task", "classification", "--out", str(tmp_path / "r"), "--quiet", *TINY,
                 f"task.train_file={train}", f"task.dev_file={dev}", f"task.test_file={test}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_nan_labels_in_parquet_are_refused_not_made_classes(tmp_path, capsys):
    train = _parquet(tmp_path / "train.parquet", _rows([0.0, float("nan"), 1.0, float("nan"), float("nan")]))
    err = _refused(tmp_path, capsys, train)
    assert f"{train} row 2 has no value in 'label' (missing, null or NaN)" in err, err


def test_null_label_in_json_lines_is_refused(tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _rows(["a", "b", None]))
    assert f"{train} row 3 has no value in 'label'" in _refused(tmp_path, capsys, train)


@pytest.mark.parametrize("label", [[1, 2], {"x": 1}, 0.5])
def test_labels_that_are_not_strings_or_integers_are_refused(tmp_path, capsys, label):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": "a b c", "label": label}] * 2)
    err = _refused(tmp_path, capsys, train)
    assert f"{train} row 1 has the label {label!r}; labels must be strings or integers" in err, err


def test_string_and_integer_labels_are_refused_naming_both_rows(tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _rows([0, 1, 0]))
    dev = _jsonl(tmp_path / "dev.jsonl", _rows(["0", "1"]))
    err = _refused(tmp_path, capsys, train, dev=dev)
    assert f"{dev} row 1 has the label '0' but {train} row 1 has 0; give every label as a string or every " \
           "label as an integer" in err, err


def test_integral_float_labels_are_the_integers(tmp_path):
    """A Parquet integer column with missing values stores floats; once filled, 1.0 is the class 1."""
    train = _parquet(tmp_path / "train.parquet", _rows([0.0, 1.0, 0.0]))
    dev = _jsonl(tmp_path / "dev.jsonl", _rows([1, 0]))
    cfg = finetune_config("classification", {}, TINY + [f"task.train_file={train}", f"task.dev_file={dev}",
                                                        f"task.test_file={dev}"])
    task = task_class("classification")(cfg)
    splits = task.load_splits()
    assert [r["label"] for r in splits["train"]] == [0, 1, 0]
    assert task.head_config()["id2label"] == {0: "0", 1: "1"}  # the class names, not "0.0" and "1.0"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_invalid_utf8_is_one_sentence(tmp_path, capsys, suffix):
    train = tmp_path / f"train{suffix}"
    row = b'{"text": "caf\xe9", "label": "a"}'
    train.write_bytes(b'{"text": "ok", "label": "b"}\n' + row + b"\n" if suffix == ".jsonl" else b"[" + row + b"]")
    err = _refused(tmp_path, capsys, train)
    line = 2 if suffix == ".jsonl" else 1
    assert f"{train} is not valid UTF-8 (byte 0xe9 on line {line}); save it as UTF-8" in err, err


def test_classification_json_under_data_is_not_taken_for_squad(tmp_path, capsys):
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"data": _rows(["a", "b"])}))
    err = _refused(tmp_path, capsys, train)
    assert f"{train} holds {{\"data\": [...]}}, the SQuAD layout, but none of its entries has 'paragraphs'" in err, err
