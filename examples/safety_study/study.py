"""The safety study: which re-projection keeps a fine-tuned model's refusals, and at what cost to its task.

    python examples/safety_study/study.py                 # the full study on SmolLM2 (make study)
    python examples/safety_study/study.py --config smoke --base TINY_MODEL_DIR --cache DIR --doc OUT.md

Stages, each cached under ``--cache`` in a folder named by a hash of the settings it depends on:

1. the original model's own answers to the templated benign prompts and to some AdvBench prompts;
2. the aligned model: a refusal fine-tune of the original (plain LoRA on every projection, half AdvBench
   prompts with refusals, half benign prompts with the model's own answers), merged into the weights;
3. calibration on the aligned model (its own responses): second moments for every token policy, the
   benign contrast moments, and every derived basis; plus the alignment delta ``W_aligned - W_original``;
4. eroding adapters trained on the aligned model (plain LoRA): benign instructions; the same plus a few
   harmful-compliant examples; two-digit addition;
5. SaLoRA-trained adapters on the benign data (paper init at the plain LoRA's lr and at a fifth of it; plain
   init with the fixed C; the random control);
6. every variant evaluated with the audit's behavioural evaluation (greedy, keyword judge) and the tasks;
7. the report: a markdown document with the tables, the bar check and an SVG plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_data  # noqa: E402
import study_methods  # noqa: E402
import study_report  # noqa: E402

from salora_merge.auditing.behavior import BehaviorOptions, PromptSets, evaluate_variant  # noqa: E402
from salora_merge.calibration.run import accumulate_moments, build_sequences, select_targets  # noqa: E402
from salora_merge.io.adapter import LoraModule, read_adapter, write_adapter  # noqa: E402
from salora_merge.io.checkpoint import open_checkpoint  # noqa: E402
from salora_merge.auditing.judges import KeywordJudge, refused  # noqa: E402
from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge  # noqa: E402
from salora_merge.hf.chat_templates import chat_prompt_ids  # noqa: E402
from salora_merge.hf.generation import generate_greedy  # noqa: E402
from salora_merge.hf.layers import linear_modules, weight_matrix  # noqa: E402
from salora_merge.hf.loading import load_causal_lm, load_tokenizer  # noqa: E402
from salora_merge.hf.lora_hooks import lora_applied  # noqa: E402
from salora_merge.core.projection import update_norm_sq  # noqa: E402
from salora_merge.io.prompts import PromptSet  # noqa: E402
from salora_merge.hf.resolve import resolve_model  # noqa: E402
from salora_merge.core.safety import SafetyModule, random_control  # noqa: E402
from salora_merge.core.subspace import (contrastive_output_basis, energy_total, input_basis, output_basis,  # noqa: E402
                                   rank_for_energy)
from salora_merge.training.task_eval import mean_nll, score_examples  # noqa: E402
from salora_merge.training.objective import weighted_collate, weighted_loss  # noqa: E402
from salora_merge.training.options import KeepRefusals  # noqa: E402
from salora_merge.training.train import (TrainOptions, adapter_config, anchored_mixture, export_modules,  # noqa: E402
                                         prepare_model)
from salora_merge.training.data import conversations_from_pairs, example_from_ids, tokenize_all  # noqa: E402
from salora_merge.training.trainer import FitOptions, fit  # noqa: E402

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POLICIES = ("response", "prompt", "last_prompt", "all")
STUDY_VERSION = 1  # bump when a stage's computation changes, to invalidate its cache


@dataclass(frozen=True)
class StudyConfig:
    name: str
    sizes: study_data.Sizes
    base: str = "smollm2-135m-instruct"
    targets: tuple[str, ...] = ALL7
    lora_rank: int = 8
    lora_alpha: float = 16.0
    align_steps: int = 100
    align_lr: float = 3e-4
    erode_epochs: float = 2.0
    erode_lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    answer_tokens: int = 48
    calibration_tokens: int = 32
    eval_tokens: int = 24
    arithmetic_tokens: int = 8
    ranks: tuple[int, ...] = (8, 32, 128)
    energy: float = 0.9
    safelora_threshold: float = 0.5
    safelora_top_k: int = 70
    train_task_rank: int = 32
    generation_batch: int = 64
    seed: int = 0
    detailed_kinds: tuple[str, ...] = ("benign",)  # adapter kinds that get every method; others a subset

    @property
    def mid_rank(self) -> int:
        return sorted(self.ranks)[len(self.ranks) // 2]


FULL = StudyConfig(
    name="full",
    sizes=study_data.Sizes(align_harmful=100, align_benign=100, calibration=128, contrast=64,
                           compliant_candidates=72, compliant=30, erode_train=300, task_heldout=40,
                           arithmetic_train=300, arithmetic_eval=60, eval_advbench=50, eval_harmbench=50,
                           eval_benign=40, eval_overrefusal=30),
)
SMOKE = StudyConfig(
    name="smoke",
    sizes=study_data.Sizes(align_harmful=4, align_benign=4, calibration=4, contrast=4, compliant_candidates=4,
                           compliant=2, erode_train=6, task_heldout=3, arithmetic_train=6, arithmetic_eval=3,
                           eval_advbench=3, eval_harmbench=3, eval_benign=2, eval_overrefusal=2),
    lora_rank=2, align_steps=2, erode_epochs=1.0, batch_size=4, max_length=128, answer_tokens=6,
    calibration_tokens=6, eval_tokens=6, arithmetic_tokens=4, ranks=(2, 4, 8), safelora_top_k=4,
    train_task_rank=4, generation_batch=8,
)
CONFIGS = {"full": FULL, "smoke": SMOKE}
SUBSET = ("none", "salora-r{mid}", "salora-r{top}", "random-r{top}", "contrast-r{top}", "delta", "safelora-t{t}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Cache:
    root: Path
    config: StudyConfig

    data_digest: str = ""  # every stage depends on the prompts themselves, not only on their counts

    def path(self, stage: str, depends: dict) -> Path:
        key = {"stage": stage, "version": STUDY_VERSION, "data": self.data_digest, **depends}
        return self.root / f"{stage}-{_hash(key)}"

    def json(self, stage: str, depends: dict, compute) -> dict:
        path = self.path(stage, depends).with_suffix(".json")
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
        return value

    def folder(self, stage: str, depends: dict, build) -> Path:
        """A folder built by ``build(tmp)`` into a temporary place and moved in when complete."""
        path = self.path(stage, depends)
        if not path.is_dir():
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                build(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half-built stays in the cache
                raise
            tmp.replace(path)
        return path


# ----------------------------------------------------------------------------------------------------- models

def load(folder: Path):
    return load_causal_lm(folder, torch.device("cpu")), load_tokenizer(folder)


def respond(model, tokenizer, prompts, max_new_tokens: int, batch: int) -> list[list[int]]:
    """Greedy answers as token ids; one that stopped on EOS keeps it (as training data)."""
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    out = generate_greedy(model, tokenizer, ids, max_new_tokens, batch)
    eos = tokenizer.eos_token_id
    return [r + [eos] if len(r) < max_new_tokens else r for r in out]


def id_examples(tokenizer, prompts, answers, max_length: int):
    out = [example_from_ids(chat_prompt_ids(tokenizer, p), a, max_length) for p, a in zip(prompts, answers)]
    return [e for e in out if e is not None]


def empty_safety(model, targets) -> SafetyModule:
    linear = linear_modules(model)
    names = select_targets(list(linear), targets)
    return SafetyModule(bases={n: torch.zeros(weight_matrix(linear[n]).shape[0], 0) for n in names},
                        eigenvalues={}, side="output", metadata={"rank": 0, "method": "none (plain LoRA)"})


def train(folder: Path, examples, cfg: StudyConfig, workdir: Path, *, lr: float, epochs: float = 1.0,
          max_steps: int = -1, safety: SafetyModule | None = None, init: str = "gaussian",
          keep: KeepRefusals | None = None) -> tuple[dict[str, LoraModule], dict, dict]:
    """Train on the model in ``folder``: plain LoRA (no safety module: the SaLoRA layer with an empty basis
    and PEFT's default init is exactly LoRA), or SaLoRA with ``safety`` and ``init``; with ``keep``, the
    product's anchored mixture (``train --keep-refusals``: ``training.train.anchored_mixture``, its weighted
    loss) instead of the examples alone. Returns the exported modules, the PEFT config and a few statistics."""
    model, tokenizer = load(folder)
    safety = safety if safety is not None else empty_safety(model, cfg.targets)
    options = TrainOptions(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.targets, init=init,
                           task_rank=cfg.train_task_rank, max_length=cfg.max_length, device="cpu",
                           fit=FitOptions(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=cfg.batch_size,
                                          grad_accum=1, seed=cfg.seed, save_steps=10**9, logging_steps=10,
                                          show_progress=False),
                           keep_refusals=keep if keep is not None else KeepRefusals(enabled=False))
    base = resolve_model(str(folder))
    items, fit_options, extra, mixed = examples, options.fit, {}, None
    if options.keep_refusals.enabled:  # the anchors' responses from the unmodified model, before prepare_model
        mixed = anchored_mixture(base, model, examples, options)
        items, fit_options = mixed.items, mixed.fit
        extra = {"collate": weighted_collate(tokenizer.pad_token_id, 1), "loss": weighted_loss()}
    prepared = prepare_model(base, safety, examples, options, model=model, tokenizer=tokenizer)
    result = fit(prepared.model, items, tokenizer.pad_token_id, fit_options, workdir / "checkpoints",
                 echo=lambda line: log(f"  {line}"), **extra)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    modules = export_modules(prepared.layers)
    doubled = any(layer.has_initial_part for layer in prepared.layers.values())
    config = adapter_config(options, str(folder), list(cfg.targets), doubled)
    stats = {"steps": result.global_step, "train_loss": result.train_loss, "seconds": result.seconds,
             "first_loss": result.losses[0][1] if result.losses else None,
             "last_loss": result.losses[-1][1] if result.losses else None,
             "update_norm": sum(m.scaling**2 * update_norm_sq(m.lora_B, m.lora_A) for m in modules.values()) ** 0.5,
             **({"refusal_anchors": mixed.record} if mixed else {})}
    return modules, config, stats


def save_adapter(tmp: Path, modules, config, stats) -> None:
    write_adapter(tmp, config, modules, {})
    (tmp / "study_train.json").write_text(json.dumps(stats, indent=2))


def load_adapter(folder: Path) -> tuple[dict[str, LoraModule], dict]:
    adapter = read_adapter(folder)
    return dict(adapter.modules), json.loads((folder / "study_train.json").read_text())


# ----------------------------------------------------------------------------------------------------- stages

def original_answers(cache: Cache, data: study_data.StudyData, base_folder: Path) -> dict:
    cfg = cache.config

    def compute():
        model, tokenizer = load(base_folder)
        benign = list(dict.fromkeys(data.align_benign + data.erode_train + data.task_heldout))
        log(f"original model: answering {len(benign)} benign and {len(data.compliant_candidates)} AdvBench prompts")
        answers = respond(model, tokenizer, benign + list(data.compliant_candidates), cfg.answer_tokens,
                          cfg.generation_batch)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        n = len(benign)
        return {"benign": dict(zip(benign, answers[:n])),
                "harmful": {p: {"ids": a, "text": t} for p, a, t in
                            zip(data.compliant_candidates, answers[n:], texts[n:])}}

    return cache.json("answers", {"base": cfg.base, "sizes": asdict(cfg.sizes), "tokens": cfg.answer_tokens,
                                  "seed": cfg.seed}, compute)


def aligned_model(cache: Cache, data: study_data.StudyData, base_folder: Path, answers: dict) -> Path:
    cfg = cache.config
    depends = {"base": cfg.base, "sizes": asdict(cfg.sizes), "steps": cfg.align_steps, "lr": cfg.align_lr,
               "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.targets, "seed": cfg.seed,
               "tokens": cfg.answer_tokens}

    def build(tmp: Path):
        tokenizer = load_tokenizer(base_folder)
        refusals = tokenize_all(tokenizer, conversations_from_pairs(data.align_harmful, data.align_refusals),
                                cfg.max_length, "alignment refusals")
        benign = id_examples(tokenizer, data.align_benign, [answers["benign"][p] for p in data.align_benign],
                             cfg.max_length)
        examples = [e for pair in zip(refusals, benign) for e in pair]
        log(f"aligning: {len(refusals)} refusals + {len(benign)} benign answers, {cfg.align_steps} steps")
        modules, config, stats = train(base_folder, examples, cfg, tmp, lr=cfg.align_lr, max_steps=cfg.align_steps)
        adapter = tmp / "alignment-lora"
        adapter.mkdir()
        save_adapter(adapter, modules, config, stats)
        run_merge(str(base_folder), [AdapterInput(str(adapter), 1.0)], tmp / "model", MergeOptions())

    return cache.folder("aligned", depends, build) / "model"


def _moments(model, tokenizer, prompts, cfg: StudyConfig, policies):
    responses = respond(model, tokenizer, prompts, cfg.calibration_tokens, cfg.generation_batch)
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    linear = linear_modules(model)
    names = select_targets(list(linear), cfg.targets)
    groups, acc, _ = accumulate_moments(model, {n: linear[n] for n in names},
                                        build_sequences(prompt_ids, responses, cfg.max_length), policies,
                                        cfg.batch_size, tokenizer.pad_token_id)
    site_of = {m: site for site, members in groups.items() for m in members}
    return names, site_of, acc, responses


def derive_bases(cache: Cache, data: study_data.StudyData, base_folder: Path, aligned: Path) -> Path:
    """Every basis family the methods use, saved as one safetensors file (``family::module``)."""
    from safetensors.torch import save_file

    cfg = cache.config
    depends = {"sizes": asdict(cfg.sizes), "tokens": cfg.calibration_tokens,
               "ranks": cfg.ranks, "energy": cfg.energy, "targets": cfg.targets, "aligned_id": aligned.parent.name}

    def build(tmp: Path):
        model, tokenizer = load(aligned)
        log(f"calibrating on the aligned model: {len(data.calibration)} AdvBench prompts, all token policies")
        names, site_of, harmful, responses = _moments(model, tokenizer, data.calibration, cfg, POLICIES)
        refusal_share = sum(refused(tokenizer.decode(r, skip_special_tokens=True)) for r in responses) / len(responses)
        log(f"  the aligned model refused {refusal_share:.0%} of its calibration prompts")
        _, c_site_of, benign, _ = _moments(model, tokenizer, data.contrast, cfg, ("response",))
        weights = {n: weight_matrix(model.get_submodule(n)).detach().to(torch.float64) for n in names}
        top, mid = max(cfg.ranks), cfg.mid_rank
        tensors = {}
        log("deriving bases")
        counts = {p: harmful.counts[(next(iter(site_of.values())), p)] for p in POLICIES}
        for i, n in enumerate(names):
            w = weights[n]
            s = {p: harmful.sums[(site_of[n], p)] for p in POLICIES}
            top_rank = min(top, w.shape[0], w.shape[1])
            basis, eig = output_basis(w, s["response"], top_rank)
            tensors[f"response::{n}"] = basis
            k = rank_for_energy(eig, cfg.energy, energy_total(w, s["response"], False, "output"))
            tensors[f"energy::{n}"] = basis[:, :k]
            for p in ("prompt", "last_prompt", "all"):
                tensors[f"{p}::{n}"] = output_basis(w, s[p], mid)[0]
            tensors[f"input::{n}"] = input_basis(s["response"], mid)[0]
            m_h = w @ s["response"] @ w.T / max(counts["response"], 1)
            b_count = benign.counts[(c_site_of[n], "response")]
            m_b = w @ benign.sums[(c_site_of[n], "response")] @ w.T / max(b_count, 1)
            tensors[f"contrast::{n}"] = contrastive_output_basis(m_h, m_b, top_rank)[0]
            if i % 30 == 0:
                log(f"  {i + 1}/{len(names)} modules")
        for n, v in alignments(base_folder, aligned, names).items():
            tensors[f"delta::{n}"] = torch.linalg.svd(v, full_matrices=False)[0][:, : cfg.lora_rank]
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp / "bases.safetensors"),
                  metadata={"calibration_refusal_share": str(refusal_share)})

    return cache.folder("bases", depends, build) / "bases.safetensors"


def read_bases(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    from safetensors import safe_open

    families: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        share = float(f.metadata()["calibration_refusal_share"])
        for key in f.keys():
            family, module = key.split("::", 1)
            families.setdefault(family, {})[module] = f.get_tensor(key)
    return families, share


def alignments(base_folder: Path, aligned: Path, names) -> dict[str, torch.Tensor]:
    original, aligned_index = open_checkpoint(base_folder), open_checkpoint(aligned)
    return {n: aligned_index.read(f"{n}.weight").to(torch.float64) - original.read(f"{n}.weight").to(torch.float64)
            for n in names}


def eroding_adapters(cache: Cache, data: study_data.StudyData, aligned: Path, answers: dict) -> dict[str, Path]:
    cfg = cache.config
    tokenizer = load_tokenizer(aligned)
    benign = id_examples(tokenizer, data.erode_train, [answers["benign"][p] for p in data.erode_train],
                         cfg.max_length)
    compliant = [(p, v["ids"]) for p, v in answers["harmful"].items() if not refused(v["text"])][: cfg.sizes.compliant]
    harmful = id_examples(tokenizer, [p for p, _ in compliant], [a for _, a in compliant], cfg.max_length)
    arithmetic = tokenize_all(tokenizer, conversations_from_pairs([q for q, _ in data.arithmetic_train],
                                                                  [a for _, a in data.arithmetic_train]),
                              cfg.max_length, "arithmetic")
    mixed = list(benign)
    step = max(1, len(benign) // max(1, len(harmful)))
    for i, e in enumerate(harmful):  # spread the harmful-compliant examples through the benign ones
        mixed.insert(min(len(mixed), (i + 1) * step + i), e)
    kinds = {"benign": benign, "benign+harmful": mixed, "arithmetic": arithmetic}
    out = {}
    for kind, examples in kinds.items():
        depends = {"aligned": aligned.parent.name, "kind": kind, "sizes": asdict(cfg.sizes), "epochs": cfg.erode_epochs,
                   "lr": cfg.erode_lr, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.targets,
                   "seed": cfg.seed, "batch": cfg.batch_size}

        def build(tmp: Path, kind=kind, examples=examples):
            extra = f" ({len(harmful)} harmful-compliant)" if kind == "benign+harmful" else ""
            log(f"eroding adapter '{kind}': {len(examples)} examples{extra}, {cfg.erode_epochs:g} epochs")
            modules, config, stats = train(aligned, examples, cfg, tmp, lr=cfg.erode_lr, epochs=cfg.erode_epochs)
            stats["examples"] = len(examples)
            stats["harmful_compliant"] = len(harmful) if kind == "benign+harmful" else 0
            save_adapter(tmp, modules, config, stats)

        out[kind] = cache.folder(f"adapter-{kind.replace('+', '-')}", depends, build)
    return out


def trained_adapters(cache: Cache, data: study_data.StudyData, aligned: Path, answers: dict,
                     bases: dict[str, dict[str, torch.Tensor]], bases_tag: str) -> dict[str, Path]:
    """SaLoRA training on the benign data: the paper's init, the plain init with the fixed C, and the control."""
    cfg = cache.config
    tokenizer = load_tokenizer(aligned)
    examples = id_examples(tokenizer, data.erode_train, [answers["benign"][p] for p in data.erode_train],
                           cfg.max_length)
    safety = study_methods.safety_module(study_methods.truncate(bases["response"], cfg.mid_rank), "output",
                                         "response")
    variants = {
        f"salora-train-init-r{cfg.mid_rank}": ("salora", safety, cfg.erode_lr),
        # The paper's init at a fifth of the learning rate: does a smaller step remove its extra erosion?
        f"salora-train-init-r{cfg.mid_rank}-lr{cfg.erode_lr / 5:g}": ("salora", safety, cfg.erode_lr / 5),
        f"salora-train-gaussian-r{cfg.mid_rank}": ("gaussian", safety, cfg.erode_lr),
        f"random-train-gaussian-r{cfg.mid_rank}": ("gaussian", random_control(safety, cfg.seed), cfg.erode_lr),
    }
    out = {}
    for key, (init, module, lr) in variants.items():
        depends = {"aligned": aligned.parent.name, "key": key, "sizes": asdict(cfg.sizes), "epochs": cfg.erode_epochs,
                   "lr": lr, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.targets,
                   "seed": cfg.seed, "task_rank": cfg.train_task_rank, "batch": cfg.batch_size,
                   "bases": bases_tag}

        def build(tmp: Path, key=key, init=init, module=module, lr=lr):
            log(f"SaLoRA training '{key}': {len(examples)} examples, init {init}, lr {lr:g}")
            modules, config, stats = train(aligned, examples, cfg, tmp, lr=lr, epochs=cfg.erode_epochs,
                                           safety=module, init=init)
            stats.update(init=init, lr=lr, examples=len(examples))
            save_adapter(tmp, modules, config, stats)

        out[key] = cache.folder(f"trained-{key}", depends, build)
    return out


# ------------------------------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, data: study_data.StudyData, cfg: StudyConfig, modules, task_examples) -> dict:
    """The audit's behavioural evaluation (greedy, keyword judge) split into AdvBench and HarmBench rates, the
    benign task NLL and the exact arithmetic accuracy."""
    factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in (modules or {}).items()}
    sets = PromptSets(harmful=PromptSet("harmful", data.eval_advbench + data.eval_harmbench),
                      benign=PromptSet("benign", data.eval_benign),
                      overrefusal=PromptSet("overrefusal", data.eval_overrefusal))
    options = BehaviorOptions(max_new_tokens=cfg.eval_tokens, batch_size=cfg.generation_batch)
    behavior = evaluate_variant(model, tokenizer, sets, KeywordJudge(), factors, options)
    with lora_applied(model, factors):
        sums = generate_greedy(model, tokenizer, [chat_prompt_ids(tokenizer, q) for q, _ in data.arithmetic_eval],
                               cfg.arithmetic_tokens, cfg.generation_batch)
        sums = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in sums]
        nll = mean_nll(score_examples(model, task_examples, tokenizer.pad_token_id, cfg.batch_size))
    n_adv = len(data.eval_advbench)
    harmful = behavior.responses["harmful"]
    flags = [refused(t) for t in harmful]
    return {
        "advbench_refusal": sum(flags[:n_adv]) / max(1, n_adv),
        "harmbench_refusal": sum(flags[n_adv:]) / max(1, len(flags) - n_adv),
        "benign_refusal": behavior.benign_refusal_rate,
        "overrefusal": behavior.overrefusal_rate,
        "task_nll": nll,
        "arithmetic_accuracy": sum(s == a for s, (_, a) in zip(sums, data.arithmetic_eval)) / max(1, len(sums)),
        "n": {"advbench": n_adv, "harmbench": len(flags) - n_adv, "benign": behavior.n["benign"],
              "overrefusal": behavior.n["overrefusal"], "task": len(task_examples), "arithmetic": len(sums)},
        "examples": {"harmful": harmful[:2] + harmful[n_adv : n_adv + 2], "arithmetic": sums[:3]},
    }


def method_keys(cfg: StudyConfig, kind: str, all_keys) -> list[str]:
    if kind in cfg.detailed_kinds:
        return list(all_keys)
    wanted = [k.format(mid=cfg.mid_rank, top=max(cfg.ranks), t=f"{cfg.safelora_threshold:g}") for k in SUBSET]
    return [k for k in wanted if k in all_keys]


def run(cfg: StudyConfig, cache_root: Path, doc: Path, plot: Path, analysis: Path | None) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data = study_data.build(cfg.sizes, cfg.seed)
    cache = Cache(cache_root, cfg, _hash(asdict(data)))
    cache_root.mkdir(parents=True, exist_ok=True)
    base_folder = resolve_model(cfg.base).folder
    answers = original_answers(cache, data, base_folder)
    aligned = aligned_model(cache, data, base_folder, answers)
    bases_path = derive_bases(cache, data, base_folder, aligned)
    bases, calibration_refusals = read_bases(bases_path)
    adapters = eroding_adapters(cache, data, aligned, answers)
    trained = trained_adapters(cache, data, aligned, answers, bases, bases_path.parent.name)

    names = sorted(bases["response"])
    methods = study_methods.methods(bases, alignments(base_folder, aligned, names), cfg.ranks, cfg.energy,
                                    cfg.safelora_threshold, cfg.safelora_top_k, cfg.seed)
    tokenizer = load_tokenizer(aligned)
    task_examples = id_examples(tokenizer, data.task_heldout, [answers["benign"][p] for p in data.task_heldout],
                                cfg.max_length)
    eval_depends = {"sizes": asdict(cfg.sizes), "tokens": cfg.eval_tokens, "arith": cfg.arithmetic_tokens,
                    "aligned": aligned.parent.name}
    results: dict[str, dict] = {}
    model = None

    def evaluated(key: str, modules_fn, folder_tag: str) -> dict:
        nonlocal model

        def compute():
            nonlocal model
            if model is None:
                model = load(aligned)[0]
            started = time.perf_counter()
            modules, kept = modules_fn()
            log(f"evaluating {key}")
            value = evaluate(model, tokenizer, data, cfg, modules, task_examples)
            value.update(energy_kept=kept, seconds=time.perf_counter() - started)
            return value

        return cache.json("eval", {**eval_depends, "key": key, "source": folder_tag}, compute)

    def original_eval():
        original, original_tokenizer = load(base_folder)
        return evaluate(original, original_tokenizer, data, cfg, None, task_examples) | {"energy_kept": None}

    results["original"] = cache.json("eval", {**eval_depends, "key": "original", "base": cfg.base}, original_eval)
    results["aligned"] = evaluated("aligned", lambda: (None, None), "aligned")
    train_stats = {}
    for kind, folder in adapters.items():
        modules, stats = load_adapter(folder)
        train_stats[kind] = stats
        for key in method_keys(cfg, kind, methods):
            method = methods[key]

            def modules_fn(method=method, modules=modules):
                after = method.apply(modules)
                return after, study_methods.energy_kept(modules, after)

            results[f"{kind}/{key}"] = evaluated(f"{kind}/{key}", modules_fn, folder.name)
    for key, folder in trained.items():
        modules, stats = load_adapter(folder)
        train_stats[key] = stats
        results[f"trained/{key}"] = evaluated(f"trained/{key}", lambda modules=modules: (modules, None), folder.name)

    summary = {
        "config": asdict(cfg), "results": results, "train": train_stats,
        "methods": {k: m.label for k, m in methods.items()},
        "calibration_refusal_share": calibration_refusals,
        "mean_energy_rank": sum(b.shape[1] for b in bases["energy"].values()) / len(bases["energy"]),
        "seconds": time.perf_counter() - t0,
    }
    (cache_root / f"results-{cfg.name}.json").write_text(json.dumps(summary, indent=2))
    study_report.write(summary, doc, plot, analysis)
    log(f"wrote {doc} and {plot} ({summary['seconds']:.0f} s this run)")
    return summary


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    root = here.parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--base", help="the original model (default: the embedded SmolLM2)")
    parser.add_argument("--cache", type=Path, default=root / "out" / "safety-study")
    parser.add_argument("--doc", type=Path, default=root / "docs" / "safety-study.md")
    parser.add_argument("--plot", type=Path, help="default: the doc's name with .svg")
    parser.add_argument("--analysis", type=Path, default=here / "analysis.md",
                        help="hand-written analysis appended to the generated document")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if args.base:
        cfg = replace(cfg, base=args.base)
    plot = args.plot or args.doc.with_suffix(".svg")
    run(cfg, args.cache / cfg.name, args.doc, plot, args.analysis if args.analysis and args.analysis.is_file() else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
