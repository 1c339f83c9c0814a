"""Prompt discovery (refit's --task-prompts discover): the user-turn frame from three template families, the
salience score against a direct float64 KL, the base model's refusals dropped, the repair's report and held-out
prompts, and the bad inputs (one line, nothing written)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.core.salience import response_kl

LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<start_of_turn>model\n' }}{% endif %}")
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(tmp_path, template: str, bos: str, eos: str, specials: list[str]):
    from conftest import build_tokenizer

    tok = build_tokenizer(tmp_path)
    tok.add_tokens(specials, special_tokens=True)
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family,template,bos,eos,specials,prefix,stop", [
    ("chatml", SMOL, "<|im_start|>", "<|im_end|>", [],
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
    ("llama3", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
     ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    ("gemma", GEMMA, "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
     "<bos><start_of_turn>user\n", "<end_of_turn>"),
])
def test_the_user_turn_frame_comes_from_the_template(tmp_path, family, template, bos, eos, specials, prefix, stop):
    from salora_merge.hf.chat_templates import user_turn_frame
    from salora_merge.hf.chat_templates import chat_prompt_ids

    tok = _tokenizer(tmp_path, template, bos, eos, specials)
    frame = user_turn_frame(tok)
    assert tok.decode(list(frame.prefix_ids)) == prefix
    # the prefix is exactly how a real user turn opens: a prompt's ids start with it, then the user's text
    ids = chat_prompt_ids(tok, "Sort these numbers")
    assert ids[: len(frame.prefix_ids)] == list(frame.prefix_ids)
    assert tok.decode(ids[len(frame.prefix_ids):]).startswith("Sort these numbers" + stop)
    assert tok.convert_tokens_to_ids(stop) in frame.stop_ids and frame.end_text.startswith(stop)


def test_no_chat_template_is_a_one_line_error(tmp_path):
    from conftest import build_tokenizer

    from salora_merge.errors import InputError
    from salora_merge.hf.chat_templates import user_turn_frame

    tok = build_tokenizer(tmp_path)
    tok.chat_template = None
    with pytest.raises(InputError, match="has none: give the adapter's task prompts with --task-prompts FILE"):
        user_turn_frame(tok)


def test_salience_equals_a_direct_float64_kl():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(3, 4, 11, generator=g), torch.randn(3, 4, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = response_kl(p_logits, q_logits, mask)
    for row in range(3):
        terms = []
        for t in range(4):
            if mask[row, t]:
                p = [math.exp(x) for x in p_logits[row, t].double().tolist()]
                q = [math.exp(x) for x in q_logits[row, t].double().tolist()]
                zp, zq = sum(p), sum(q)
                terms.append(sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q)))
        want = sum(terms) / len(terms) if terms else 0.0
        assert float(got[row]) == pytest.approx(want, rel=1e-5, abs=1e-7)


def _model(folder):
    from salora_merge.hf.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(folder, torch.device("cpu")), load_tokenizer(folder)


def _factors(adapter):
    from salora_merge.io.adapter import read_adapter

    return {n: (m.lora_A, m.lora_B, m.scaling) for n, m in read_adapter(adapter).modules.items()}


def test_salience_on_a_model_is_the_kl_along_the_base_answer(tiny_model_dir, tmp_path):
    """judge_and_score against the model's own logits with and without the adapter, in float64, along the base
    model's greedy answer; a zero adapter scores 0."""
    from conftest import make_peft_adapter

    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy
    from salora_merge.hf.lora_hooks import lora_applied
    from salora_merge.training.discovery import DiscoveryOptions, judge_and_score

    model, tok = _model(tiny_model_dir)
    factors = _factors(make_peft_adapter(tiny_model_dir, tmp_path / "lora"))
    prompts = ["Add 2 and 3.", "Name a colour.", "Sort: 3, 1, 2"]
    options = DiscoveryOptions(refusal_tokens=5, salience_tokens=3, batch_size=2)
    refusals, got = judge_and_score(model, tok, factors, prompts, options)
    assert refusals == [False] * 3  # random weights say no refusal phrase
    for prompt, score in zip(prompts, got):
        ids = chat_prompt_ids(tok, prompt)
        answer = (generate_greedy(model, tok, [ids], 5, 1)[0] or [tok.eos_token_id])[:3]
        seq = torch.tensor([ids + answer])
        with torch.no_grad(), lora_applied(model, factors):
            p = torch.log_softmax(model(seq).logits[0].double(), -1)
        with torch.no_grad():
            q = torch.log_softmax(model(seq).logits[0].double(), -1)
        at = range(len(ids) - 1, len(ids) - 1 + len(answer))
        want = sum(float((p[t].exp() * (p[t] - q[t])).sum()) for t in at) / len(answer)
        assert want > 0 and score == pytest.approx(want, rel=1e-4, abs=1e-7)
    # A zero adapter: 0 up to rounding (the base side comes from the generation's cached steps, the adapted side
    # from one forward: the two paths round differently, ~1e-8 nats, against scores of order 1e-3 above).
    zero = {n: (a, torch.zeros_like(b), s) for n, (a, b, s) in factors.items()}
    assert max(judge_and_score(model, tok, zero, prompts, options)[1]) < 1e-6 < min(got) / 100


def test_the_fast_paths_match_the_plain_ones(tiny_model_dir):
    """greedy_with_logits gives generate_greedy's answers and the logits a teacher-forced forward gives along
    them; response_logits_only gives response_logits' logits and mask (responses of unequal lengths, one empty)."""
    from salora_merge.hf.generation import greedy_with_logits, response_logits, response_logits_only
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy, stop_token_ids

    model, tok = _model(tiny_model_dir)
    ids = [chat_prompt_ids(tok, p) for p in ("Add 2 and 3.", "Name a colour please, any one.", "Hi")]
    answers, steps = greedy_with_logits(model, ids, 6, 4, tok.pad_token_id, stop_token_ids(model, tok))
    assert answers == generate_greedy(model, tok, ids, 6, 3)
    heads = [a[:4] for a in answers]
    want, mask = response_logits(model, ids, heads, tok.pad_token_id)
    assert mask.any()
    torch.testing.assert_close(steps[:, : want.shape[1]] * mask[..., None], want, rtol=1e-4, atol=1e-4)
    responses = [[5, 6, 7], [], [9]]
    want, want_mask = response_logits(model, ids, responses, tok.pad_token_id)
    got, got_mask = response_logits_only(model, ids, responses, tok.pad_token_id)
    assert torch.equal(got_mask, want_mask) and want_mask.sum() == 4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_discovery_drops_what_the_base_refuses_and_ranks_by_salience(tiny_model_dir, tmp_path, monkeypatch):
    """A hint the base model refuses never reaches the ranking; the rest come back sorted by salience, with the
    sampled turns deduplicated and each counted."""
    from conftest import make_peft_adapter

    import salora_merge.training.discovery as discovery
    from salora_merge.hf.generation import greedy_with_logits

    model, tok = _model(tiny_model_dir)
    factors = _factors(make_peft_adapter(tiny_model_dir, tmp_path / "lora"))
    harmful = "Explain how to build a pipe bomb."
    refusal = tok("I'm sorry, I cannot help with that.", add_special_tokens=False)["input_ids"]
    harmful_ids = tok(harmful, add_special_tokens=False)["input_ids"]

    def base_answers(model, prompts, *args):
        out, steps = greedy_with_logits(model, prompts, *args)
        contains = lambda p: any(p[i:i + len(harmful_ids)] == harmful_ids for i in range(len(p)))  # noqa: E731
        return [refusal if contains(p) else o for p, o in zip(prompts, out)], steps

    monkeypatch.setattr(discovery, "greedy_with_logits", base_answers)
    options = discovery.DiscoveryOptions(candidates=8, turn_tokens=12, salience_tokens=2, batch_size=4)
    hints = ["Format this list as JSON: a, b", harmful, "format this list as json: a, b"]
    found = discovery.discover_prompts(model, tok, factors, options, pool=["Add 2 and 3.", "Name a colour."],
                                       hints=hints)
    assert found.refused_by_base == [harmful]
    prompts = [c.prompt for c in found.ranked]
    assert harmful not in prompts and "Add 2 and 3." in prompts and "Format this list as JSON: a, b" in prompts
    assert found.duplicates >= 1 and found.sampled == 8
    scores = [c.salience for c in found.ranked]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    assert {c.source for c in found.ranked} <= {"sampled", "pool", "hint"}
    # the same seed samples the same turns
    again = discovery.discover_prompts(model, tok, factors, options, pool=["Add 2 and 3.", "Name a colour."],
                                       hints=hints)
    assert [c.prompt for c in again.ranked] == prompts


def test_split_ranked_holds_out_a_seeded_quarter_of_the_top():
    from salora_merge.training.discovery import Candidate, split_ranked

    ranked = [Candidate(f"p{i}", "pool", 10.0 - i) for i in range(30)]
    used, held = split_ranked(ranked, top=12, heldout=4, seed=0)
    assert len(used) == 12 and len(held) == 4
    assert {c.prompt for c in used} | {c.prompt for c in held} == {f"p{i}" for i in range(16)}
    assert not {c.prompt for c in used} & {c.prompt for c in held}
    assert split_ranked(ranked, 12, 4, 0) == (used, held) and split_ranked(ranked, 12, 4, 1) != (used, held)
    assert split_ranked(ranked[:4], 12, 4, 0)[1] == [ranked[i] for i in range(4) if ranked[i] in
                                                      split_ranked(ranked[:4], 12, 4, 0)[1]]


def test_repair_with_no_task_data_discovers_and_reports_the_prompts(tiny_model_dir, tmp_path, monkeypatch):
    """The default repair (refit, no --task-prompts): the report lists the distilled prompts with their scores and
    the held-out ones, which the agreement check used; none of them is the one the base refuses."""
    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    hints = tmp_path / "hints.txt"
    hints.write_text("\n".join(f"Add {i} and {i + 3}." for i in range(12)) + "\n")
    out = tmp_path / "repaired"
    result = CliRunner().invoke(main, [
        "repair", "--base", str(tiny_model_dir), "--adapter", str(adapter), "-o", str(out), "--max-anchors", "4",
        "--answer-tokens", "4", "--refit-batch", "4", "--steps", "2", "--discover-candidates", "6",
        "--discover-tokens", "8", "--distill-top", "8", "--heldout-task-prompts", "2", "--task-hints", str(hints),
        "--discover-pool", "none", "--max-eval-prompts", "2", "--eval-new-tokens", "4", "--boundary-prompts", "none",
        "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "salora_repair.json").read_text())
    found = report["method_report"]["discovery"]
    assert report["task_prompts"] == "discover" and report["method_report"]["task_prompts"] == "discover"
    assert len(found["distilled"]) == report["task_prompts_used"] and len(found["heldout"]) == 2
    assert report["task_prompts_heldout"] == 2 and report["task"]["prompts"] == 2
    assert all({"prompt", "source", "salience"} <= set(r) for r in found["distilled"] + found["heldout"])
    distilled = [r["prompt"] for r in found["distilled"]]
    assert not set(distilled) & {r["prompt"] for r in found["heldout"]}
    saliences = [r["salience"] for r in found["distilled"]]
    assert saliences == sorted(saliences, reverse=True)


@pytest.mark.parametrize("extra,message", [
    (["--discover-candidates", "0"], "--discover-candidates must be at least 1"),
    (["--task-hints", "EMPTY"], "--task-hints"),
    (["--task-prompts", "TASK", "--task-hints", "TASK"], "--task-hints join the prompts that discovery ranks"),
])
def test_discovery_bad_inputs(tiny_model_dir, tmp_path, monkeypatch, extra, message):
    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "task.txt").write_text("Add 1 and 2.\nAdd 3 and 4.\n")
    paths = {"EMPTY": str(tmp_path / "empty.txt"), "TASK": str(tmp_path / "task.txt")}
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    result = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                       "--method", "refit", "--max-anchors", "4", "--steps", "1",
                                       *[paths.get(e, e) for e in extra], "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_discovery_without_a_chat_template_fails_in_one_line(tmp_path, monkeypatch):
    from conftest import build_tiny_llama, make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "raw"
    _, tok = build_tiny_llama(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (folder / extra).unlink(missing_ok=True)
    adapter = make_peft_adapter(folder, tmp_path / "lora")
    args = ["repair", "--base", str(folder), "--adapter", str(adapter), "--max-anchors", "4", "--steps", "1",
            "--answer-tokens", "4", "--discover-candidates", "4", "--discover-tokens", "6", "--max-boundary", "4",
            "--no-eval"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--task-prompts FILE" in result.output, result.output
    assert "--chat-template" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    # --chat-template gives the whole repair that template: discovery samples user turns through it
    chatml = CliRunner().invoke(main, [*args, "--chat-template", "chatml", "-o", str(tmp_path / "c"), "--json"])
    assert chatml.exit_code == 0, chatml.output
    found = json.loads((tmp_path / "c" / "salora_repair.json").read_text())["method_report"]["discovery"]
    assert found["sampled"] == 4
