"""Streamed second moments against dense float64 references on a tiny model built in the test."""

from __future__ import annotations

import json

import pytest
import torch

from salora_merge.calibration.run import CalibrationOptions, calibrate
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.layers import linear_modules, weight_matrix
from salora_merge.hf.loading import load_causal_lm, load_tokenizer
from salora_merge.core.moments import (
    MaskSlot,
    MomentAccumulator,
    group_modules_by_input,
    record_moments,
    token_masks,
)
from salora_merge.hf.resolve import resolve_model


def test_token_masks():
    masks = token_masks([2, 3], [5, 4], 6, ["response", "prompt", "last_prompt", "all"])
    assert masks["response"].int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]]
    assert masks["prompt"].int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert masks["last_prompt"].int().tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert masks["all"].int().tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError):
        token_masks([1], [2], 2, ["nonsense"])


def _model(folder):
    return load_causal_lm(folder, torch.device("cpu"))


def test_sites_group_modules_that_read_the_same_tensor(tiny_model_dir):
    model = _model(tiny_model_dir)
    linear = linear_modules(model)
    groups = group_modules_by_input(linear, lambda: model(input_ids=torch.tensor([[1, 2, 3]])))
    attn = "model.layers.0.self_attn"
    assert groups[f"{attn}.q_proj"] == [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    assert groups["model.layers.0.mlp.gate_proj"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert groups[f"{attn}.o_proj"] == [f"{attn}.o_proj"]
    assert "lm_head" not in linear
    assert len(groups) == 8  # 4 sites per layer, 2 layers
    assert not any(m._forward_pre_hooks for m in linear.values())


def test_streamed_moments_equal_dense_reference(tiny_model_dir):
    model = _model(tiny_model_dir)
    linear = linear_modules(model)
    sites = {"model.layers.1.self_attn.q_proj": linear["model.layers.1.self_attn.q_proj"],
             "model.layers.0.mlp.down_proj": linear["model.layers.0.mlp.down_proj"]}
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 250, (4, 9), generator=g)
        prompt_lengths = torch.randint(1, 4, (4,), generator=g).tolist()
        lengths = torch.randint(5, 10, (4,), generator=g).tolist()
        batches.append((ids, prompt_lengths, lengths))

    acc = MomentAccumulator({s: weight_matrix(m).shape[1] for s, m in sites.items()}, ("response", "all"))
    slot = MaskSlot()
    with torch.no_grad(), record_moments(sites, acc, slot):
        for ids, p, n in batches:
            slot.masks = token_masks(p, n, ids.shape[1], ["response", "all"])
            model(input_ids=ids)
    assert not any(m._forward_pre_hooks for m in sites.values())

    # Dense reference: keep every activation (test only), select rows, sum in float64.
    captured = {s: [] for s in sites}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=s: captured[s].append(args[0].detach().clone()))
               for s, m in sites.items()]
    with torch.no_grad():
        for ids, _, _ in batches:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    for site in sites:
        for stat in ("response", "all"):
            rows = torch.cat([
                x[token_masks(p, n, ids.shape[1], [stat])[stat]]
                for x, (ids, p, n) in zip(captured[site], batches)
            ]).to(torch.float64)
            reference = rows.T @ rows
            assert acc.counts[(site, stat)] == rows.shape[0]
            assert torch.allclose(acc.sums[(site, stat)], reference, rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_when_the_forward_fails(tiny_model_dir):
    model = _model(tiny_model_dir)
    module = model.model.layers[0].self_attn.q_proj
    acc = MomentAccumulator({"q": 32}, ("all",))
    with pytest.raises(RuntimeError):
        with record_moments({"q": module}, acc, MaskSlot()):
            raise RuntimeError("boom")
    assert not module._forward_pre_hooks


def test_calibration_basis_equals_dense_reference(tiny_model_dir, tmp_path):
    pairs = [{"prompt": f"How do I do bad thing {i}?" + " please" * (i % 3), "response": "I can't help." * (1 + i % 2)}
             for i in range(7)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    options = CalibrationOptions(prompts=str(path), responses="given", rank=3, batch_size=3, device="cpu",
                                 targets=("q_proj", "down_proj"))
    result = calibrate(resolve_model(str(tiny_model_dir)), options)
    safety = result.safety
    assert sorted(safety.bases) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]

    # Reference: run each example alone (no padding), keep the inputs at response positions.
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _model(tiny_model_dir)
    linear = linear_modules(model)
    captured = {n: [] for n in safety.bases}
    handles = [linear[n].register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(args[0][0].detach().clone()))
               for n in safety.bases]
    n_tokens = 0
    with torch.no_grad():
        for pair in pairs:
            prompt = chat_prompt_ids(tokenizer, pair["prompt"])
            response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            model(input_ids=torch.tensor([prompt + response]))
            for n in safety.bases:
                captured[n][-1] = captured[n][-1][len(prompt):]
            n_tokens += len(response)
    for h in handles:
        h.remove()
    assert safety.metadata["n_tokens"] == n_tokens
    for name, basis in safety.bases.items():
        x = torch.cat(captured[name]).to(torch.float64)  # (N, d_in)
        w = weight_matrix(linear[name]).detach().to(torch.float64)
        ref_u, _, _ = torch.linalg.svd(w @ x.T, full_matrices=False)
        ref = ref_u[:, :3]
        u = basis.to(torch.float64)
        assert torch.allclose(u @ u.T, ref @ ref.T, atol=1e-4), name


class _TwoBranches(torch.nn.Module):
    """Two layers whose inputs are temporaries of the same size: the allocator reuses the memory."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 8)
        self.b = torch.nn.Linear(64, 8)
        self.c = torch.nn.Linear(64, 8)

    def forward(self, x):
        out = self.a(x * 2.0)  # the temporary x * 2 is freed after this line
        out = out + self.b(x * 3.0)  # ... and x * 3 may be allocated at the same address
        return out + self.c(x * 3.0)


def test_sites_are_not_confused_by_reused_memory():
    model = _TwoBranches()
    modules = {"a": model.a, "b": model.b, "c": model.c}
    x = torch.randn(16, 64)
    for _ in range(5):
        groups = group_modules_by_input(modules, lambda: model(x))
        assert groups == {"a": ["a"], "b": ["b"], "c": ["c"]}


def test_sites_group_the_same_tensor_in_a_real_sized_stack(tiny_model_dir):
    model = _model(tiny_model_dir)
    linear = linear_modules(model)
    for _ in range(3):
        groups = group_modules_by_input(linear, lambda: model(input_ids=torch.tensor([[1, 2, 3, 4]])))
        assert len(groups) == 8


@pytest.mark.parametrize("d", [40, 300, 1000])
def test_symmetric_gram_equals_dense_product(d):
    from salora_merge.core.moments import symmetric_gram

    rows = torch.randn(257, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    out = symmetric_gram(rows)
    assert torch.allclose(out, rows.T @ rows, rtol=1e-12, atol=1e-9)
    assert torch.allclose(out, out.T, rtol=1e-12, atol=1e-9)


def test_flattened_layer_inputs_count_exactly_the_selected_tokens():
    """A layer fed ``(B * T, d)`` (OPT's fc1/fc2, an MoE block's shared expert) accumulates the same second moment
    as the ``(B, T, d)`` layout, equal to the dense float64 sum over the masked tokens; a layer that sees only some
    of the tokens is an error naming it."""
    from salora_merge.core.moments import MaskSlot, MomentAccumulator, masked_rows, record_moments
    from salora_merge.errors import InputError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    lin = torch.nn.Linear(4, 2).double()
    accumulator = MomentAccumulator({"flat": 4}, ("response",))
    slot = MaskSlot({"response": mask})
    with record_moments({"flat": lin}, accumulator, slot):
        lin(x.reshape(-1, 4))
    selected = x[mask]
    assert torch.allclose(accumulator.sums[("flat", "response")], selected.T @ selected, atol=1e-12)
    assert accumulator.counts[("flat", "response")] == int(mask.sum())
    assert torch.equal(masked_rows(x.reshape(15, 4), mask), masked_rows(x, mask))
    with pytest.raises(InputError, match="layer experts.0: its input has \\(6, 4\\)"):
        masked_rows(x.reshape(15, 4)[:6], mask, "experts.0")


def test_experts_that_compute_another_pattern_are_refused_by_name():
    """The routed inputs assume gate_up -> act(gate) * up -> down; an experts module that computes anything else is
    a one-line error naming it instead of silently wrong statistics."""
    from salora_merge.core.moments import MaskSlot, MomentAccumulator, expert_output, expert_site, record_moments
    from salora_merge.errors import InputError

    class Experts(torch.nn.Module):
        def __init__(self, twist: float):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 8, 4, generator=g))
            self.down_proj = torch.nn.Parameter(torch.randn(3, 4, 4, generator=g))
            self.act_fn, self.twist = torch.nn.functional.silu, twist

        def forward(self, hidden, top_k_index, top_k_weights):
            return self.twist * expert_output(hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                                              self.act_fn)

    hidden = torch.randn(6, 4)
    index, weights = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]]), torch.full((6, 2), 0.5)
    sites = {expert_site("experts", p, e): 4 for p in ("gate_up_proj", "down_proj") for e in range(3)}
    for twist, fails in ((1.0, False), (2.0, True)):
        module = Experts(twist)
        accumulator = MomentAccumulator(sites, ("all",))
        slot = MaskSlot({"all": torch.ones(2, 3, dtype=torch.bool)})
        with record_moments({}, accumulator, slot, experts={"experts": module}):
            if fails:
                with pytest.raises(InputError, match="layer experts: Experts does not compute the fused-expert"):
                    module(hidden, index, weights)
            else:
                module(hidden, index, weights)
                assert accumulator.counts[("experts.gate_up_proj[0]", "all")] == 4  # tokens 0, 2, 3 and 5
