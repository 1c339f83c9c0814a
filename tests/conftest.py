"""Shared fixtures: tiny Llama models (hidden 32-64, 2 layers) built inside the tests, and PEFT adapters."""

from __future__ import annotations

import json
import os

# The push tests drive the real huggingface_hub client against a local stand-in Hub that speaks
# git-LFS, not Xet; the client reads this once, at import.
os.environ["HF_HUB_DISABLE_XET"] = "1"
from pathlib import Path

import pytest
import torch

@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """The salora-merge cache of this test session (anchors' responses and the like) in a temporary folder, its
    ``models`` (the built-in aliases, converted once) shared with the user's cache; a test that sets its own
    ``SALORA_MERGE_CACHE`` still does. Left alone when the caller set one."""
    if os.environ.get("SALORA_MERGE_CACHE"):
        yield
        return
    from salora_merge.hf import hub

    shared = hub.hf_home() / "salora-merge" / "models"
    shared.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("salora-merge-cache")
    (cache / "models").symlink_to(shared, target_is_directory=True)
    os.environ["SALORA_MERGE_CACHE"] = str(cache)
    yield
    os.environ.pop("SALORA_MERGE_CACHE", None)


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(folder: Path):
    """A byte-level tokenizer (one token per byte) with ChatML special tokens; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


def build_tiny_llama(folder: Path, hidden: int = 32, seed: int = 0, kv_heads: int = 2):
    """A random 2-layer Llama saved as a safetensors checkpoint with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture, other weights (another seed)."""
    folder = tmp_path_factory.mktemp("tiny-llama-other")
    build_tiny_llama(folder, seed=1)
    return folder


@pytest.fixture(scope="session")
def wider_model_dir(tmp_path_factory) -> Path:
    """Another shape (hidden 48): adapters for the tiny model do not fit it."""
    folder = tmp_path_factory.mktemp("tiny-llama-wide")
    build_tiny_llama(folder, hidden=48)
    return folder


def make_peft_adapter(model_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Create an adapter with PEFT itself, with non-zero random lora_B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    model = get_peft_model(base, config)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_calibration_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = [f"Explain how to do harmful thing number {i}, step by step." for i in range(12)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


TRAIN_TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
TRAIN_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture(scope="session")
def safety_file(tiny_model_dir, tiny_calibration_prompts, tmp_path_factory) -> Path:
    """An output-side safety module (rank 4) of the tiny model over ``TRAIN_TARGETS``, for the training tests."""
    from click.testing import CliRunner

    from salora_merge.cli import main

    out = tmp_path_factory.mktemp("train-safety") / "safety.safetensors"
    result = CliRunner().invoke(main, [
        "calibrate", "--base", str(tiny_model_dir), "--prompts", str(tiny_calibration_prompts), "--rank", "4",
        "--max-new-tokens", "8", "--targets", ",".join(TRAIN_TARGETS), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """Sixteen instruction examples ("Repeat the word alpha." -> "alpha alpha alpha")."""
    path = tmp_path_factory.mktemp("train-data") / "data.jsonl"
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in TRAIN_WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
