"""Anchored training (--keep-refusals): the mixture's shares, the weighted loss against a direct sum, the plain
path unchanged, the report and card, bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def anchor_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("anchor-prompts") / "anchors.txt"
    path.write_text("".join(f"Explain how to make weapon number {i}.\n" for i in range(5)))
    return path


def _train(tiny_model_dir, safety_file, data_file, out, *extra):
    return CliRunner().invoke(main, [
        "train", "--base", str(tiny_model_dir), "--data", str(data_file), "--safety", str(safety_file),
        "--rank", "4", "--alpha", "8", "--targets", ",".join(TARGETS), "--lr", "1e-2", "--batch-size", "4",
        "--grad-accum", "1", "--device", "cpu", "--quiet", "-o", str(out), *extra])


# ---------------------------------------------------------------- the mixture, pure


@pytest.mark.parametrize("n_task,n_anchors,k,batch,passes", [(30, 7, 2, 8, 2), (16, 40, 1, 8, 1), (5, 3, 3, 4, 3)])
def test_every_batch_holds_the_share_asked_for(n_task, n_anchors, k, batch, passes):
    from salora_merge.training.mixture import mixed_order

    order = mixed_order(n_task, n_anchors, k, batch, passes, seed=1)
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    for b in batches[:-1]:
        assert len(b) == batch and sum(a for a, _ in b) == k
    last = batches[-1]
    task_last = sum(not a for a, _ in last)
    assert sum(a for a, _ in last) == round(task_last * k / (batch - k))
    # every user example exactly `passes` times; anchors cycled evenly
    assert Counter(i for a, i in order if not a) == {i: passes for i in range(n_task)}
    used = Counter(i for a, i in order if a)
    assert set(used) <= set(range(n_anchors)) and max(used.values()) - min(used.values()) <= 1
    assert order == mixed_order(n_task, n_anchors, k, batch, passes, seed=1)  # seeded
    assert order != mixed_order(n_task, n_anchors, k, batch, passes, seed=2)


def test_shares_and_steps():
    from salora_merge.errors import InputError
    from salora_merge.training.mixture import anchors_per_batch, mixture_steps

    assert anchors_per_batch(0.125, 8) == 1 and anchors_per_batch(0.25, 8) == 2 and anchors_per_batch(0.01, 8) == 1
    assert anchors_per_batch(0.0, 8) == 0
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(InputError, match="--anchor-share"):
            anchors_per_batch(bad, 8)
    with pytest.raises(InputError, match="no place for your data"):
        anchors_per_batch(0.9, 4)
    # 300 examples, 7 of them per batch of 8, 2 batches per step, 2 epochs: 86 batches, 43 steps
    assert mixture_steps(300, 1, 8, 2, 2.0, -1) == (43, 2)
    assert mixture_steps(300, 1, 8, 1, 1.0, 100) == (100, 3)


# ---------------------------------------------------------------- the loss against a direct sum


def test_the_anchor_tokens_carry_their_weights_in_the_loss(tiny_model_dir):
    from salora_merge.core.refit_loss import IGNORE, token_weights
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.training.data import TokenizedExample
    from salora_merge.training.objective import WeightedItem, weighted_collate, weighted_loss

    model = load_causal_lm(tiny_model_dir, torch.device("cpu"))
    task = TokenizedExample([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])
    anchor = TokenizedExample([11, 12, 13, 14, 15, 16, 17], [IGNORE, IGNORE, 13, 14, 15, 16, 17])
    items = [WeightedItem(task, [0.0 if x == IGNORE else 1.0 for x in task.labels]),
             WeightedItem(anchor, token_weights(anchor.labels, 2, 4.0))]
    assert items[1].weights == [0, 0, 4.0, 4.0, 1.0, 1.0, 1.0]
    batch = weighted_collate(0, 1)(items)
    with torch.no_grad():
        got = weighted_loss()(model, batch)
    # direct: each learned token's cross-entropy from the float64 log-softmax of each sequence alone, weighted
    total, weight = 0.0, 0.0
    for item in items:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([item.example.input_ids])).logits[0].double(), -1)
        for t, (label, w) in enumerate(zip(item.example.labels, item.weights)):
            if label != IGNORE:
                total += w * float(-logp[t - 1, label])
                weight += w
    assert float(got) == pytest.approx(total / weight, rel=1e-5)
    with torch.no_grad():
        uniform = weighted_loss()(model, weighted_collate(0, 1)([items[0], WeightedItem(anchor, token_weights(
            anchor.labels, 2, 1.0))]))
    assert abs(float(uniform) - float(got)) > 1e-4  # the weights matter


# ---------------------------------------------------------------- train


def test_anchored_training_mixes_reports_and_batches_exactly(tiny_model_dir, safety_file, data_file, anchor_file,
                                                              tmp_path, monkeypatch):
    import salora_merge.training.train as train

    seen = []
    real = train.weighted_loss

    def spy(*args, **kwargs):
        loss = real(*args, **kwargs)

        def wrapped(model, batch):
            seen.append(int((batch["weights"].max(dim=1).values == 4.0).sum()))  # anchors: weight-4 tokens
            return loss(model, batch)
        return wrapped

    monkeypatch.setattr(train, "weighted_loss", spy)
    out = tmp_path / "anchored"
    result = _train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "5", "--anchor-share", "0.25",
                    "--anchor-prompts", str(anchor_file), "--boundary-prompts", "none", "--json")
    assert result.exit_code == 0, result.output
    assert seen == [1] * 5  # one anchor in every batch of 4
    report = json.loads(result.stdout)
    mixed = report["refusal_anchors"]
    assert mixed["per_batch"] == 1 and mixed["batch_size"] == 4 and mixed["distinct"] == 5
    assert mixed["anchor_prompts"] == anchor_file.name or anchor_file.name in mixed["anchor_prompts"]
    assert report["global_step"] == 5 and mixed["examples_added"] >= 5
    card = (out / "README.md").read_text()
    assert "Refusal anchors mixed in" in card and f"{mixed['examples_added']} examples added" in card
    assert json.loads((out / "salora_train.json").read_text())["refusal_anchors"] == mixed


def test_no_keep_refusals_trains_exactly_as_before(tiny_model_dir, safety_file, data_file, anchor_file, tmp_path):
    """--no-keep-refusals: the adapter of the plain path (prepare_model, the Trainer on the user's examples with
    the model's own loss), tensor for tensor; with anchors the adapter differs."""
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.io.adapter import read_adapter
    from salora_merge.io.safety_file import load_safety_module
    from salora_merge.training.data import load_conversations, tokenize_all
    from salora_merge.training.options import TrainOptions
    from salora_merge.training.prepare import export_modules, prepare_model
    from salora_merge.training.trainer import FitOptions, fit

    plain = _train(tiny_model_dir, safety_file, data_file, tmp_path / "plain", "--max-steps", "4",
                   "--no-keep-refusals", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["refusal_anchors"] is None
    base = resolve_model(str(tiny_model_dir))
    examples = tokenize_all(base.tokenizer, load_conversations(data_file), 512, str(data_file))
    fit_options = FitOptions(max_steps=4, lr=1e-2, batch_size=4, grad_accum=1, show_progress=False)
    options = TrainOptions(rank=4, alpha=8.0, targets=TARGETS, device="cpu", fit=fit_options)
    prepared = prepare_model(base, load_safety_module(safety_file), examples, options)
    fit(prepared.model, examples, base.tokenizer.pad_token_id, fit_options, tmp_path / "ckpt")
    want = export_modules(prepared.layers)
    got = read_adapter(tmp_path / "plain").modules
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].lora_A, want[name].lora_A) and torch.equal(got[name].lora_B, want[name].lora_B)
    anchored = _train(tiny_model_dir, safety_file, data_file, tmp_path / "anchored", "--max-steps", "4",
                      "--anchor-prompts", str(anchor_file), "--boundary-prompts", "none")
    assert anchored.exit_code == 0, anchored.output
    other = read_adapter(tmp_path / "anchored").modules
    assert any(not torch.equal(other[n].lora_B, want[n].lora_B) for n in want)


@pytest.mark.parametrize("extra,message", [
    (["--anchor-share", "1"], "--anchor-share must be at least 0 and below 1"),
    (["--anchor-share", "1.5"], "--anchor-share must be at least 0 and below 1"),
    (["--anchor-share", "0.9"], "leaves no place for your data"),
    (["--anchor-prompts", "EMPTY"], "--anchor-prompts"),
    (["--anchor-prompts", "MISSING"], "--anchor-prompts"),
    (["--boundary-prompts", "EMPTY"], "--boundary-prompts"),
    (["--anchor-first-weight", "-1"], "--anchor-first-weight"),
    (["--anchor-tokens", "-1"], "--anchor-tokens"),
])
def test_bad_anchor_options_are_one_line_and_write_nothing(tiny_model_dir, safety_file, data_file, tmp_path,
                                                           extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    extra = [str(empty) if x == "EMPTY" else str(tmp_path / "missing.txt") if x == "MISSING" else x for x in extra]
    out = tmp_path / "out"
    result = _train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "2", *extra)
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]


def test_anchors_cached_for_another_model_are_not_used(tiny_model_dir, other_model_dir, tmp_path, monkeypatch):
    """The anchors' responses are cached per base model (its weights' fingerprint): another model's cached
    responses are never read for this one."""
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.training.anchors import base_responses

    cache = tmp_path / "anchors"
    first, second = resolve_model(str(tiny_model_dir)), resolve_model(str(other_model_dir))
    ids = [chat_prompt_ids(first.tokenizer, "Explain how to make a weapon.")]
    base_responses(first, load_causal_lm(first.folder, torch.device("cpu")), ids, 6, 2, cache=cache)
    (entry,) = list(cache.iterdir())
    entry.write_text(json.dumps({"responses": [[1, 2, 3]]}))  # what the first model "said"
    other_ids = [chat_prompt_ids(second.tokenizer, "Explain how to make a weapon.")]
    got = base_responses(second, load_causal_lm(second.folder, torch.device("cpu")), other_ids, 6, 2, cache=cache)
    assert got != [[1, 2, 3]] and len(list(cache.iterdir())) == 2
    assert base_responses(first, None, ids, 6, 2, cache=cache) == [[1, 2, 3]]  # the first model's entry is its own


def test_anchor_tokens_keep_only_the_first_response_tokens(tiny_model_dir, anchor_file, data_file):
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.training.data import load_conversations, tokenize_all
    from salora_merge.training.options import KeepRefusals, TrainOptions
    from salora_merge.training.train import anchored_mixture
    from salora_merge.training.trainer import FitOptions

    base = resolve_model(str(tiny_model_dir))
    model = load_causal_lm(base.folder, torch.device("cpu"))
    examples = tokenize_all(base.tokenizer, load_conversations(data_file), 128, "data")
    learned = lambda item: sum(w > 0 for w in item.weights)  # noqa: E731
    for tokens, most in ((3, 3), (None, 8)):
        keep = KeepRefusals(anchor_prompts=str(anchor_file), boundary_prompts="none", answer_tokens=8,
                            train_tokens=tokens)
        options = TrainOptions(targets=TARGETS, fit=FitOptions(max_steps=4, batch_size=4, grad_accum=1),
                               keep_refusals=keep)
        mixture = anchored_mixture(base, model, examples, options)
        anchors = [i for i in mixture.items if max(i.weights) == keep.first_weight]
        assert anchors and max(learned(i) for i in anchors) <= most
        assert mixture.record["response_tokens"] == (tokens or 8)
    assert max(learned(i) for i in anchors) > 3  # uncut, the tiny model's answers are longer than 3
