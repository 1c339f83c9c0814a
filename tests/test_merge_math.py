"""The merge arithmetic against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from salora_merge.errors import InputError
from salora_merge.core.merge_math import LowRankUpdate, cast_exact, merged_weight, parse_size


def test_merged_weight_equals_dense_float64_sum_both_layouts():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=g)
    ups = [LowRankUpdate(torch.randn(3, 20, generator=g), torch.randn(12, 3, generator=g), 0.7),
           LowRankUpdate(torch.randn(2, 20, generator=g), torch.randn(12, 2, generator=g), -1.25)]
    expected = w.double() + sum(u.dense() for u in ups)
    assert torch.allclose(merged_weight(w, ups).double(), expected, atol=1e-5)
    # Conv1D layout: the weight is stored (d_in, d_out); the same update, transposed.
    fan = [LowRankUpdate(u.lora_A, u.lora_B, u.scale, fan_in_fan_out=True) for u in ups]
    assert torch.allclose(merged_weight(w.T.contiguous(), fan).double(), expected.T, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        merged_weight(w[:5], ups)


def test_bfloat16_weight_is_accumulated_in_float32_and_rounded_once():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    up = LowRankUpdate(torch.randn(4, 64, generator=g) * 1e-3, torch.randn(64, 4, generator=g) * 1e-3, 1.0)
    merged = merged_weight(w, [up])
    assert merged.dtype == torch.float32
    assert torch.equal(cast_exact(merged, torch.bfloat16, "w"), (w.float() + up.dense(torch.float32)).to(torch.bfloat16))


def test_cast_exact_refuses_overflow_only():
    x = torch.tensor([1.0, -7e4, 3.0])
    with pytest.raises(InputError, match=r"tensor t: value 7e\+04 overflows float16"):
        cast_exact(x, torch.float16, "t")
    assert cast_exact(x, torch.bfloat16, "t").dtype == torch.bfloat16
    y = torch.tensor([1.0, float("nan"), 65504.0])  # NaN stays NaN, the largest float16 is kept
    out = cast_exact(y, torch.float16, "t")
    assert torch.isnan(out[1]) and out[2] == 65504.0


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("1.5 gb", 15 * 10**8), ("1234", 1234)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "5XB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError, match="--shard-size"):
        parse_size(text)


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_update_equals_pefts_einsum_in_float64(transposed):
    """A LoRA on a fused 3-D expert parameter, unpacked from PEFT's layout (lora_A (r*E, d_in), expert-major rows;
    lora_B (d_out, r*E), rank-major columns) and added per expert, equals PEFT's own formula for the delta."""
    from salora_merge.core.merge_math import ExpertUpdate, merged_weight
    from salora_merge.io.adapter import ParamLayout, ParamLora

    g = torch.Generator().manual_seed(0)
    experts, rank, d_out, d_in = 3, 2, 5, 4
    a_all = torch.randn(rank * experts, d_in, generator=g, dtype=torch.float64)
    b_all = torch.randn(d_out, rank * experts, generator=g, dtype=torch.float64)
    shape = (experts, d_in, d_out) if transposed else (experts, d_out, d_in)
    lora = ParamLora(ParamLayout("m.experts", "w", shape, transposed), "m.experts", a_all, b_all, 0.5)
    # PEFT's ParamWrapper.get_delta_weight, written out: einsum over B (o, r, e) and A (e, r, i).
    peft_b = b_all.reshape(d_out, rank, experts)
    peft_a = a_all.reshape(experts, rank, d_in)
    expected = torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", peft_b, peft_a) * 0.5
    a, b = lora.expert_factors()
    update = ExpertUpdate(a, b, 0.5, transposed)
    assert torch.allclose(update.dense(), expected, atol=1e-12)
    weight = torch.randn(*shape, generator=g, dtype=torch.float64)
    assert torch.allclose(merged_weight(weight, [update]), weight + expected, atol=1e-12)
