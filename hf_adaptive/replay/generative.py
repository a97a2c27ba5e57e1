"""`GenerativeReplayPlugin`: LAMOL-style generative replay, plain or prototype-conditioned.

LAMOL (Sun et al., 2020) lets the language model itself be the memory: while learning a task it is also
trained to *generate* that task's examples (a language-modelling loss over the whole row, prompt included,
weighted by `lm_lambda`; LAMOL uses 0.25), and before a new task starts it writes pseudo-examples of every
old task, which are then replayed.

Here, with a task's template ``"<task name> : {text} ?"`` and verbalizer ``["yes", "no"]``:

* Learning to generate: the term ``generative_lm`` is the causal-LM loss over every non-padding token of
  the current batch (taken from the batch's own logits, no extra forward) and of the replayed pseudo rows.
* Generating (`on_task_begin` with index > 0): ``n = round(generative_replay_ratio × len(new task's train
  split))`` pseudo-examples, split evenly over the old tasks. Each is sampled from the prompt ``<bos> <task
  name> :`` (the template's text before ``{text}``) until ``<eos>`` (or `max_new_tokens`).
* Quality filter (`parse_generated`): the decoded row must be exactly ``template(text) + " " + label`` with a
  non-empty text free of ``<unk>``, of the task name and of the template's own literal words (``:``, ``?``:
  they would make the row ambiguous), a label word from the task's
  verbalizer, and the generation must have stopped at ``<eos>``; anything else is dropped. Up to
  `max_rounds` rounds of sampling (each asking for 1.5 × what is still missing) fill each task's share.
* Replaying: accepted pseudo-examples are re-encoded exactly like real rows (`encode_example`), kept in a
  balanced `ReplayMemory` that is rebuilt before every new task, and replayed like exact replay:
  ``LossTerm("generative_replay", answer loss of replay_batch_size pseudo rows, weight=replay_alpha)``; the
  answer loss is the task loss's (label-smoothed when ``args.label_smoothing_factor > 0``, `_common.answer_loss`),
  while ``generative_lm`` stays the plain LAMOL language-modelling loss (it is not a classification loss).

Prototype-conditioned variant (``conditioning="prototype"``): at the end of each task the answer-position
features of `prototype_samples` real rows (a seeded sample stratified by label of the
task's tokenized rows, `_common.context_rows`) are
computed (see `feature.py`); for each class, the `prototypes_per_class` real rows nearest to the class mean
(the class prototype, L2 distance) with distinct prefixes are kept, but only the first `prefix_words` tokens of
their text. Generation for that task then starts
from ``<bos> <task name> : <prototype prefix>``, cycling over the stored prototypes of every class, so the
pseudo-examples are anchored near real, class-representative inputs and balanced over classes (plain LAMOL
sampling drifts toward the majority label). The filter is the same.

Memory bound: the pseudo memory holds at most ``n`` rows of ``8 L`` bytes (+ ~ 200 bytes overhead), rebuilt
per task (104 bytes of payload per row on the built-in suite); per old task the plain variant keeps only its
name, template and verbalizer (JSON), the prototype variant also ``prototypes_per_class × n_classes ×
prefix_words × 4`` bytes of prefix tokens and ``n_classes × hidden × 4`` bytes of prototypes (16 + 512 bytes
per task with the defaults on the tiny model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..plugins import ContinualPlugin, LossTerm, TaskContext
from ..tasks import Task, encode_example
from ..tasks.losses import IGNORE_INDEX, answer_cross_entropy
from ..tasks.prompting import row_options
from ..utils.options import OptionSource
from . import _common
from ._common import (
    ConfigValue,
    answer_loss,
    collate,
    trainer_tokenizer,
)
from .buffer import ReplayMemory
from .config import (
    CONDITIONINGS,
    GENERATIVE_REPLAY_OPTIONS,
    GENERATIVE_REPLAY_SOURCE,
    GenerativeReplayConfig,
)
from .feature import class_prototypes, extract_features, prompt_tokens

__all__ = ["CONDITIONINGS", "GenerativeReplayPlugin", "TaskSpec", "lm_loss", "parse_generated"]


@dataclass
class TaskSpec:
    """What generation needs to know of an old task (JSON only)."""

    name: str
    template: str
    verbalizer: list[str]

    @property
    def prefix(self) -> str:
        """The template's text before ``{text}``, e.g. ``"first_color :"``."""
        return self.template.split("{text}")[0].strip()

    def as_task(self) -> Task:
        return Task(
            name=self.name, train_dataset=None, eval_dataset=None, verbalizer=self.verbalizer, template=self.template
        )


def parse_generated(text: str, spec: TaskSpec, unk_token: str | None = "<unk>") -> tuple[str, int] | None:
    """The quality filter: ``(input text, label index)`` when `text` is a well-formed example, else None.

    `text` is the decoded row without special tokens, e.g. ``"first_color : red cat ... ? yes"``.
    """
    words = text.split()
    before, after = (part.split() for part in spec.template.split("{text}", 1))
    if words[: len(before)] != before:
        return None
    # the label: the longest verbalizer entry (labels may be several words) that ends the row
    label = None
    for index in sorted(range(len(spec.verbalizer)), key=lambda i: -len(spec.verbalizer[i].split())):
        label_words = spec.verbalizer[index].split()
        if label_words and words[-len(label_words) :] == label_words:
            label = index
            break
    if label is None:
        return None
    end = len(words) - len(spec.verbalizer[label].split())
    if end - len(after) <= len(before) or words[end - len(after) : end] != after:
        return None
    body = words[len(before) : end - len(after)]
    literal = set(before) | set(after) | {spec.name}
    if any(w in literal or w == unk_token for w in body):
        return None
    return " ".join(body), label


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every non-padding token (the LAMOL generation loss): the answer-token
    loss with every non-padding token labelled."""
    return answer_cross_entropy(logits, input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX))


class GenerativeReplayPlugin(ContinualPlugin):
    """LAMOL-style generative replay (plain task-prefixed or prototype-conditioned generation).

    Args:
        config: a `GenerativeReplayConfig` (None: its defaults); keyword `overrides` replace single fields of it:
        ratio: pseudo-examples generated per example of the new task (`generative_replay_ratio`).
        alpha: weight of the pseudo-example answer loss (`replay_alpha`).
        lm_lambda: weight of the generation (LM) loss on real and pseudo rows; 0 turns it off.
        batch_size: pseudo rows replayed per step (`replay_batch_size`).
        conditioning: ``"task"`` (plain LAMOL) or ``"prototype"``.
        max_new_tokens: generation budget per pseudo-example.
        top_k: top-k sampling (0: sample the full distribution); temperature: sampling temperature.
        max_rounds: sampling rounds per old task before giving up on its share.
        prototype_samples, prototypes_per_class, prefix_words: prototype variant, see the module docstring.
        seed: seed of generation and sampling (the run's `seed` in `from_config`).
    """

    name = "generative_replay"
    term_names = ("generative_lm", "generative_replay")
    options: ClassVar[tuple[OptionSource, ...]] = GENERATIVE_REPLAY_OPTIONS

    ratio = ConfigValue()
    alpha = ConfigValue()
    lm_lambda = ConfigValue()
    batch_size = ConfigValue()
    conditioning = ConfigValue()
    max_new_tokens = ConfigValue()
    top_k = ConfigValue()
    temperature = ConfigValue()
    max_rounds = ConfigValue()
    prototype_samples = ConfigValue()
    prototypes_per_class = ConfigValue()
    prefix_words = ConfigValue()
    seed = ConfigValue()

    def __init__(self, config: GenerativeReplayConfig | None = None, **overrides: Any) -> None:
        self.config = _common.configure(GenerativeReplayConfig, config, overrides, "GenerativeReplayPlugin")
        self.specs: list[TaskSpec] = []
        #: how pseudo-examples become rows: the run's prompt format, length limit and eos (set in `on_task_begin`)
        self.row_options: dict[str, Any] = {}
        #: prototype variant, per task name: {"prefixes": [[ids]], "prefix_classes": [int], "prototypes": tensor}
        self.prototypes: dict[str, dict[str, Any]] = {}
        self.pseudo = ReplayMemory(1, policy="balanced", seed=self.seed)
        self.stats: dict[str, dict[str, int]] = {}  # per old task: generated / accepted at the last generation

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None, **overrides: Any) -> GenerativeReplayPlugin:
        """From the `generative_replay_*` options, `replay_alpha` and `replay_batch_size` (shared with exact
        replay, validated under their own names) and the run's `seed`."""
        own = _common.config_sharing_replay_options(
            config, GENERATIVE_REPLAY_SOURCE, alpha="alpha", batch_size="batch_size"
        )
        return cls(own, **overrides)

    @property
    def needs_full_logits(self) -> bool:
        """The LM loss (`lm_lambda` > 0) reads the task batch's logits at every position, not only the answer's."""
        return self.lm_lambda > 0

    # ------------------------------------------------------------------ task boundaries
    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        task = context.task
        if task.name not in [s.name for s in self.specs]:
            self.specs.append(TaskSpec(task.name, task.template, list(task.verbalizer)))
        if self.conditioning == "prototype":
            rows = _common.context_rows(context, self.prototype_samples, seed=self.seed)
            classes = torch.tensor([r["label"] for r in rows], dtype=torch.long)
            self.prototypes[task.name] = self.select_prototypes(trainer.model, task, rows, classes, context.tokenizer)

    def select_prototypes(
        self, model: torch.nn.Module, task: Any, rows: list[dict], classes: torch.Tensor, tokenizer: Any
    ) -> dict[str, Any]:
        """Per class, the prefixes of the real rows nearest (L2, answer-position features) to the class mean."""
        prompts = prompt_tokens(rows)
        feats = extract_features(model, prompts, tokenizer.pad_token_id or 0)
        protos, present = class_prototypes(feats, classes)
        n_template = len(
            tokenizer(TaskSpec(task.name, task.template, []).prefix, add_special_tokens=False)["input_ids"]
        )
        start = n_template + (1 if tokenizer.bos_token_id is not None else 0)
        prefixes, prefix_classes = [], []
        for proto, c in zip(protos, present.tolist(), strict=True):
            members = (classes == c).nonzero().flatten()
            dist = (feats[members] - proto).pow(2).sum(-1)
            kept: list[list[int]] = []
            for j in members[dist.argsort()].tolist():  # nearest first, distinct prefixes only
                prefix = prompts[j][start : start + self.prefix_words]
                if prefix not in kept:
                    kept.append(prefix)
                if len(kept) == self.prototypes_per_class:
                    break
            prefixes += kept
            prefix_classes += [c] * len(kept)
        return {"prefixes": prefixes, "prefix_classes": prefix_classes, "prototypes": protos}

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        task, task_index = context.task, context.index
        old = [s for s in self.specs if s.name != task.name]
        n_total = round(self.ratio * len(context.train_dataset))
        if task_index == 0 or not old or n_total == 0:
            self.pseudo = ReplayMemory(1, policy="balanced", seed=self.seed)
            return
        tokenizer = context.tokenizer
        args = getattr(trainer, "args", None)
        self.row_options = row_options(args)
        self.pseudo = ReplayMemory(max(n_total, len(old)), policy="balanced", seed=self.seed + task_index)
        self.stats = {}
        bar = _generation_bar(trainer, self.pseudo.capacity, task.name)
        try:
            for j, spec in enumerate(old):
                share = self.pseudo.capacity // len(old) + (1 if j < self.pseudo.capacity % len(old) else 0)
                rows, generated = self.generate(
                    trainer.model, tokenizer, spec, share, seed=self.seed + 1000 * task_index + j, bar=bar
                )
                self.pseudo.add(spec.name, rows)
                self.stats[spec.name] = {"wanted": share, "generated": generated, "accepted": len(rows)}
        finally:
            bar.close()

    # ------------------------------------------------------------------ generation
    def _prompts(self, tokenizer: Any, spec: TaskSpec, n: int) -> list[list[int]]:
        base = tokenizer(spec.prefix, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            base = [tokenizer.bos_token_id] + base
        stored = self.prototypes.get(spec.name) if self.conditioning == "prototype" else None
        if not stored or not stored["prefixes"]:
            return [base] * n
        # cycle over classes first, then over each class's prototypes, so every class gets an equal share
        by_class: dict[int, list[list[int]]] = {}
        for p, c in zip(stored["prefixes"], stored["prefix_classes"], strict=True):
            by_class.setdefault(int(c), []).append(list(p))
        order = [by_class[c][i % len(by_class[c])] for i in range(max(map(len, by_class.values()))) for c in by_class]
        return [base + order[i % len(order)] for i in range(n)]

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, n: int, seed: int = 0, bar: Any = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Up to `n` filtered pseudo-examples of `spec` as training rows, and how many sequences were sampled.

        `bar` (a tqdm bar, optional) advances by one per accepted row: sampling on a real model takes minutes."""
        accepted: list[dict[str, Any]] = []
        generated = 0
        was_training = model.training
        model.eval()
        device = _common.model_device(model)
        eos = tokenizer.eos_token_id
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for _ in range(self.max_rounds):
                    missing = n - len(accepted)
                    if missing <= 0:
                        break
                    prompts = self._prompts(tokenizer, spec, math.ceil(1.5 * missing))
                    generated += len(prompts)
                    for length in sorted({len(p) for p in prompts}):  # equal-length groups: no padding needed
                        group = torch.tensor([p for p in prompts if len(p) == length], device=device)
                        out = model.generate(
                            input_ids=group,
                            attention_mask=torch.ones_like(group),
                            do_sample=True,
                            top_k=self.top_k,
                            temperature=self.temperature,
                            max_new_tokens=self.max_new_tokens,
                            eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                        )
                        for seq in out[:, length:].tolist():
                            if eos is None or eos not in seq:
                                continue  # ran out of tokens: not a finished example
                            full = group[0].tolist() + seq[: seq.index(eos)]
                            parsed = parse_generated(
                                tokenizer.decode(full, skip_special_tokens=True), spec, tokenizer.unk_token
                            )
                            if parsed is not None and len(accepted) < n:
                                example = {"text": parsed[0], "label": parsed[1]}
                                row = encode_example(spec.as_task(), example, tokenizer, **self.row_options)
                                accepted.append(row)
                                if bar is not None:
                                    bar.update(1)
        finally:
            model.train(was_training)
        return accepted, generated

    # ------------------------------------------------------------------ loss
    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if not model.training:
            return []
        terms, lm_parts = [], []
        if self.lm_lambda > 0 and "input_ids" in inputs:
            logits = getattr(outputs, "logits", None)
            if logits is None and isinstance(outputs, dict):
                logits = outputs.get("logits")
            if logits is None:
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            lm_parts.append(lm_loss(logits, inputs["input_ids"], mask))
        if self.alpha > 0 and len(self.pseudo) > 0:
            batch = collate(
                self.pseudo.sample(self.batch_size),
                trainer_tokenizer(trainer, "GenerativeReplayPlugin"),
                _common.model_device(model),
            )
            if self.lm_lambda > 0:  # one forward serves both terms
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
                terms.append(LossTerm(self.name, answer_loss(trainer, model, batch, out), weight=self.alpha))
                lm_parts.append(lm_loss(out.logits, batch["input_ids"], batch["attention_mask"]))
            else:
                terms.append(LossTerm(self.name, answer_loss(trainer, model, batch), weight=self.alpha))
        if lm_parts:
            terms.append(LossTerm("generative_lm", torch.stack(lm_parts).mean(), weight=self.lm_lambda))
        return terms

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        protos = {
            name: {
                "prefix_lengths": torch.tensor([len(p) for p in v["prefixes"]], dtype=torch.int64),
                "prefix_ids": torch.tensor([t for p in v["prefixes"] for t in p], dtype=torch.int32),
                "prefix_classes": list(v["prefix_classes"]),
                "prototypes": v["prototypes"],
            }
            for name, v in self.prototypes.items()
        }
        return {
            "specs": [s.__dict__ for s in self.specs],
            "prototypes": protos,
            "stats": self.stats,
            "pseudo_capacity": self.pseudo.capacity,
            "pseudo": self.pseudo.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.specs = [TaskSpec(s["name"], s["template"], list(s["verbalizer"])) for s in state["specs"]]
        self.prototypes = {}
        for name, v in state["prototypes"].items():
            flat, prefixes, offset = v["prefix_ids"].tolist(), [], 0
            for n in v["prefix_lengths"].tolist():
                prefixes.append(flat[offset : offset + n])
                offset += n
            self.prototypes[name] = {
                "prefixes": prefixes,
                "prefix_classes": [int(c) for c in v["prefix_classes"]],
                "prototypes": v["prototypes"],
            }
        self.stats = state.get("stats", {})
        self.pseudo = ReplayMemory(int(state["pseudo_capacity"]), policy="balanced", seed=self.seed)
        self.pseudo.load_state_dict(state["pseudo"])


def _generation_bar(trainer: Any, total: int, task_name: str) -> Any:
    """A progress bar (with ETA) over the pseudo-rows to sample before `task_name`; off with the trainer's
    `disable_tqdm` and on every process but the main one."""
    from tqdm.auto import tqdm

    args = getattr(trainer, "args", None)
    main = getattr(trainer, "is_world_process_zero", lambda: True)()
    return tqdm(
        total=total,
        desc=f"generative replay: sampling before {task_name}",
        unit="row",
        leave=False,
        disable=bool(getattr(args, "disable_tqdm", False)) or not main,
    )
