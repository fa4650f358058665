"""A longctx causal LM under EleutherAI's lm-eval (`python -m longctx.lm_eval`, the extra
longctx-toolkit[lm-eval]), offline: a tiny saved LongctxForCausalLM on a local multiple-choice task
(a task YAML with `dataset_path: json` and `data_files`); nothing is downloaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # imports transformers' model code: about 5 s alone
def test_without_lm_eval_the_entry_point_names_the_extra(monkeypatch, capsys):
    from longctx import lm_eval as entry
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert entry.main(["--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'longctx-toolkit[lm-eval]'" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_saved_causal_lm_runs_under_lm_eval_offline_on_a_local_task(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    code = main(["pretrain", "--out", str(tmp_path / "clm"), "--quiet", "objective=clm", "train.steps=2",
                 "train.batch_size=2", "train.save_every=0", "train.eval_batches=1", "data.seq_len=64",
                 "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.window=8",
                 "data.tokenizer=bytes"])
    assert code == 0, capsys.readouterr().err
    rows = [{"question": f"The colour of item {i} is", "choices": [" red", " blue", " green"], "label": i % 3}
            for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: longctx_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "longctx.lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tmp_path / 'clm' / 'model'}", "--tasks", "longctx_tiny", "--include_path",
                        str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2", "--output_path",
                        str(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = res["results"]["longctx_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["longctx_tiny"]["effective"] == 6
