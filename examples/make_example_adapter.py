"""Make the example adapter shipped in examples/adapters/smollm2-benign-lora.

A plain LoRA (r=8, alpha=16, q_proj and v_proj) trained with PEFT on SmolLM2-135M-Instruct for two
epochs over 69 benign instructions paired with the model's own greedy answers: the kind of benign
fine-tune that erodes refusals. Deterministic on CPU (seeded); about 2-4 minutes on 2 cores.

    .venv/bin/python examples/make_example_adapter.py [-o examples/adapters/smollm2-benign-lora]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.generation import generate_greedy
from salora_merge.hf.loading import load_causal_lm, load_tokenizer
from salora_merge.hf.resolve import resolve_model

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=HERE / "adapters" / "smollm2-benign-lora")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    random.seed(0)
    base = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base.folder)
    model = load_causal_lm(base.folder, torch.device("cpu"))
    instructions = [l.strip() for l in (HERE / "data" / "benign_instructions.txt").read_text().splitlines() if l.strip()]
    prompts = [chat_prompt_ids(tokenizer, p) for p in instructions]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens=64, batch_size=16)
    examples = [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers)]

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for epoch in range(args.epochs):
        random.shuffle(examples)
        total = 0.0
        for start in range(0, len(examples), 8):
            batch = examples[start : start + 8]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (p, a) in enumerate(batch):
                seq = p + a
                ids[row, : len(seq)] = torch.tensor(seq)
                labels[row, len(p) : len(seq)] = torch.tensor(a)  # loss on response tokens only
                mask[row, : len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}: mean loss {total / len(examples):.4f}")
    model.peft_config["default"].base_model_name_or_path = base.model_id  # not the local cache path
    model.save_pretrained(str(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
