"""The newcomer's path (issue 30): a finetune from a saved model takes that model's limits, export names
its extra, a resume refuses a changed schedule unless asked to extend, eval refuses a model without a
language-model head, and `longctx --help` imports neither torch nor transformers."""
import json
import subprocess
import sys

import pytest

from longctx.cli import main
from test_tasks import _squad_rows, _write_jsonl


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGCTX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("LONGCTX_FAULT", raising=False)
        yield


@pytest.fixture(scope="module")
def lm_512(tmp_path_factory):
    """A saved masked LM with 512 learned positions, as the default comparison pretrains."""
    from longctx.data.tokenizer import ByteTokenizer
    from longctx.models import LongctxConfig, LongctxForMaskedLM

    tok = ByteTokenizer()
    out = tmp_path_factory.mktemp("lm") / "model"
    cfg = LongctxConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        window=8, max_position_embeddings=512, pad_token_id=tok.pad_id, sep_token_id=tok.sep_id)
    LongctxForMaskedLM(cfg).save_pretrained(out)
    return out


def qa_files(tmp_path):
    return [f"task.{s}_file=" + _write_jsonl(tmp_path / f"{s}.jsonl", _squad_rows(n, i))
            for i, (s, n) in enumerate([("train", 4), ("dev", 2), ("test", 2)])]


TINY_FT = ["--quiet", "data.tokenizer=bytes", "train.steps=1", "train.batch_size=2", "train.save_every=0", "train.eval_batches=1",
           "task.bootstrap=20"]


# --- item 2: a finetune from a saved model takes its positions as the default length ---
def test_finetune_from_a_saved_model_takes_its_positions_as_the_default_length(lm_512, tmp_path):
    out = tmp_path / "ft"
    # the README's line: QA's own length is 1024, the model has 512 positions
    assert main(["finetune", "--task", "qa", "--init-from", str(lm_512), "--out", str(out), *TINY_FT,
                 *qa_files(tmp_path)]) == 0
    assert json.loads((out / "run_config.json").read_text())["data"]["seq_len"] == 512


def test_finetune_longer_than_the_saved_models_positions_suggests_a_length_that_works(lm_512, tmp_path, capsys):
    args = ["finetune", "--task", "qa", "--init-from", str(lm_512), "--out", str(tmp_path / "ft"), *TINY_FT,
            *qa_files(tmp_path)]
    assert main(args + ["data.seq_len=1024", "model.max_position_embeddings=1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.seq_len=512" in err[0] and "max_position_embeddings=1024" not in err[0]
    assert not (tmp_path / "ft").exists()


# --- item 3: export names the extra it needs ---
def test_onnx_export_without_onnxscript_names_the_export_extra(lm_512, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as after the README's install: not importable
    assert main(["export", str(lm_512), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'longctx-toolkit[export]'" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_the_test_extra_includes_the_export_extra():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["export"]) == {"onnxscript", "onnxruntime"} and "longctx-toolkit[export]" in extras["test"]


# --- item 6: eval refuses a model without a language-model head ---
def test_eval_refuses_a_finetuned_task_model(lm_512, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "qa", "--init-from", str(lm_512), "--out", str(out), *TINY_FT,
                 *qa_files(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "model"), "data.tokenizer=bytes", f"data.corpus={tmp_path}"]) == 2
    err = capsys.readouterr()
    assert "perplexity" not in err.out
    err = err.err.strip().splitlines()
    assert len(err) == 1 and "LongctxForQuestionAnswering" in err[0] and "language-model head" in err[0], err


# --- item 8: `longctx --help` imports neither torch nor transformers; importing longctx still registers ---
def _run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_cli_parser_imports_neither_torch_nor_transformers():
    out = _run_python("import sys, longctx.cli; longctx.cli.build_parser(); "
                      "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert out == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("imports", ["import longctx, transformers", "import transformers, longctx"])
def test_importing_longctx_registers_with_transformers_in_either_order(imports):
    out = _run_python(f"{imports}\nfrom transformers import AttentionInterface, AutoConfig\n"
                      "print(type(AutoConfig.for_model('longctx')).__name__, 'longctx' in AttentionInterface._global_mapping)")
    assert out == "LongctxConfig True"
