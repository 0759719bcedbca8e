"""Language modelling: token blocks in, next-token metrics out, and sampled continuations.

Targets are the blocks' ``labels`` (Hugging Face's convention: unshifted, −100 not counted);
the model's logits at position i are scored against ``labels[:, i + 1]``, counted where that
label is not −100 (the "shift" of every causal-LM loss; `kdistill.data.text.TokenBlocks`).

Metrics, over the counted positions of the **whole** evaluation set (global sums, not a mean of
per-batch means; under torchrun the sums are added over ranks):

| metric                | value                                                              |
|-----------------------|--------------------------------------------------------------------|
| `nll`                 | Σ −log p(next token) / number of counted tokens (nats per token)   |
| `perplexity`          | exp(nll)                                                           |
| `next_token_accuracy` | share of counted positions where argmax of the logits = next token |
| `bits_per_byte`       | Σ −log p(next token) / ln 2 / Σ UTF-8 bytes those tokens spell     |

The softmax runs over every row of the model's head (a head padded past the tokenizer's size
keeps its padding rows: it is the distribution the model samples from). Special tokens: a counted
``<eos>`` target adds its NLL but spells 0 bytes (it stands for the break between two documents,
not for text), so bits per byte divides the NLL of every counted token by the bytes of the text
they spell; with one ``<eos>`` per KJV chapter that is 0.1 % of the tokens. Bits per byte is
comparable across tokenizers; NLL and perplexity per token are not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data.text import EOS_ID, IGNORE_INDEX, TokenBlocks
from kdistill.distill.distiller import select_output
from kdistill.models.lm import check_vocabulary, context_limit
from kdistill.ops.collectives import all_reduce_sum
from kdistill.tasks.base import TaskDefaults

__all__ = ["LanguageModelingTask", "NextTokenMetric", "logits_of", "sample_continuations"]


def logits_of(output: Any) -> Tensor:
    """The logits ``N×L×V`` of a model output: a tensor as it is, a Hugging Face
    ``CausalLMOutput`` (any mapping) by its ``"logits"`` key."""
    if isinstance(output, Tensor):
        return output
    return select_output(output, "logits", "model")


class NextTokenMetric:
    """Sums over counted next-token positions: NLL (nats, float64), correct argmaxes, counted
    tokens and the UTF-8 bytes they spell (`token_bytes`: int64 `V`, bytes per token id)."""

    shardable = True  # sums: each rank feeds every W-th batch, reduce() adds them up
    CHUNK = 4096  # positions scored at a time (a float32 copy of CHUNK × V logits)

    def __init__(self, token_bytes: Tensor | None, ignore_index: int = IGNORE_INDEX) -> None:
        # None: the data does not say how many bytes each token spells (a user's loader):
        # bits per byte is NaN and the vocabulary is the model's
        self.token_bytes = (
            None if token_bytes is None else token_bytes.detach().to("cpu", torch.int64)
        )
        self.ignore_index = ignore_index
        self.sums = torch.zeros(4, dtype=torch.float64)  # nll, correct, counted, bytes

    def update(self, output: Any, target: Tensor) -> None:
        logits = logits_of(output).detach()
        if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
            raise ValueError(
                f"language modelling: logits must be N×L×V and labels N×L with the same N, L; got "
                f"logits {tuple(logits.shape)} and labels {tuple(target.shape)}"
            )
        vocab = logits.shape[-1] if self.token_bytes is None else len(self.token_bytes)
        if logits.shape[-1] < vocab:
            raise ValueError(
                f"language modelling: the model gives {logits.shape[-1]} logits per position but "
                f"the tokenizer has {vocab} tokens; build it with vocab_size ≥ {vocab}"
            )
        labels = target[:, 1:].reshape(-1)
        counted = labels != self.ignore_index
        labels = labels[counted]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
            raise ValueError(
                f"language modelling: labels must lie in [0, {vocab}) or be {self.ignore_index}, "
                f"found [{int(labels.min())}, {int(labels.max())}]"
            )
        rows = logits[:, :-1].reshape(-1, logits.shape[-1])  # a view: position i vs label i + 1
        nll = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        positions = torch.nonzero(counted).reshape(-1)
        for start in range(0, len(positions), self.CHUNK):  # bounded extra memory per batch
            picked = positions[start : start + self.CHUNK]
            scored = rows[picked.to(rows.device)].float()
            wanted = labels[start : start + self.CHUNK].to(rows.device)
            token_nll = F.cross_entropy(scored, wanted, reduction="none")
            nll += token_nll.double().sum().cpu()
            correct += (scored.argmax(dim=-1) == wanted).sum().double().cpu()
        spelled = (
            torch.zeros((), dtype=torch.int64)
            if self.token_bytes is None
            else self.token_bytes[labels.cpu()].sum()
        )
        self.sums += torch.stack(
            [
                nll,
                correct,
                torch.tensor(float(labels.numel()), dtype=torch.float64),
                spelled.double(),
            ]
        )

    def reduce(self) -> None:
        self.sums = all_reduce_sum(self.sums)

    def compute(self) -> dict[str, float]:
        nll_sum, correct, counted, spelled = self.sums.tolist()
        if counted == 0:
            raise ValueError("language modelling: no counted token in the evaluation set")
        nll = nll_sum / counted
        return {
            "nll": nll,
            "perplexity": math.exp(nll),
            "next_token_accuracy": correct / counted,
            "bits_per_byte": (
                nll_sum / math.log(2) / spelled
                if spelled and self.token_bytes is not None
                else math.nan
            ),
        }


class LanguageModelingTask(TaskDefaults):
    """Causal language modelling on `TokenBlocks` (`kdistill.data.text`): targets are the
    blocks' labels, registry models are built with the tokenizer's `vocab_size`, the student
    alone learns with next-token cross-entropy (``token_ce``).

    `evaluate` also takes a user's loader of ``{"input_ids", "attention_mask", "labels"}``
    batches (Hugging Face's convention): without the dataset's ``token_bytes`` bits per byte is
    NaN and the vocabulary is the model's."""

    name = "language_modeling"
    metrics = ("nll", "perplexity", "next_token_accuracy", "bits_per_byte")
    labels = {
        "nll": "NLL",
        "perplexity": "perplexity",
        "next_token_accuracy": "next-token accuracy",
        "bits_per_byte": "bits/byte",
    }
    lower_is_better = ("nll", "perplexity", "bits_per_byte")
    percent_metrics = ("next_token_accuracy",)  # the others are shown as they are
    default_hard_loss = "token_ce"
    model_output = "logits"  # what the hard loss, soft terms and metrics read of a CausalLMOutput
    eval_batch_size = 32  # N×L×V logits per evaluation batch: 32×128×2048 floats = 32 MiB
    target = "tokens"
    default_data = "kjv"  # the built-in source of this kind of data
    report_models = True  # report_section samples continuations from the models

    # prompts of the report's sampled continuations (the same for every model)
    sample_prompts = ("And it came to pass, when", "In the beginning was", "Blessed are they that")
    sample_temperature = 0.8

    def report_section(self, models: Mapping[str, nn.Module], splits: Any) -> list[str]:
        """Markdown lines for the run report: one sampled continuation per prompt from each of
        `models` (label → model; teacher, student alone, distilled students), all with the same
        prompts and seed (`sample_continuations`), decoded with the run's tokenizer."""
        tokenizer = getattr(splits, "tokenizer", None)
        if tokenizer is None or not models:
            return []
        lines = [
            "## Sampled continuations",
            "",
            f"Sampling at temperature {self.sample_temperature:g} (no top-k / top-p, at most 40 "
            "tokens, stopped at `<eos>`); prompt i is sampled with seed i, the same random "
            "numbers for every model.",
        ]
        samples = {
            label: [
                sample_continuations(
                    model, tokenizer, [prompt], temperature=self.sample_temperature, seed=index
                )[0]
                for index, prompt in enumerate(self.sample_prompts)
            ]
            for label, model in models.items()
        }
        for index, prompt in enumerate(self.sample_prompts):
            lines += ["", f"**{prompt} …**", "", "| model | continuation |", "|---|---|"]
            for label, texts in samples.items():
                text = " ".join(texts[index].split()).replace("|", "\\|")
                lines.append(f"| {label} | {text} |")
        return lines

    def prepare(self, data: Any) -> TokenBlocks:
        if not isinstance(data, TokenBlocks):
            name = getattr(data, "name", type(data).__name__)
            raise ValueError(
                f"task language_modeling: dataset {name!r} is not tokenized text; it needs "
                "kdistill.data.text.TokenBlocks (input_ids, attention_mask, labels): use "
                "data.dataset: kjv, or a factory returning TokenBlocks"
            )
        return data

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"vocab_size": self.prepare(data).vocab_size}

    def new_metric(self, model: nn.Module, data: Any) -> NextTokenMetric:
        token_bytes = getattr(data, "token_bytes", None)
        if isinstance(token_bytes, Tensor):
            check_vocabulary(model, len(token_bytes))
            return NextTokenMetric(token_bytes)
        return NextTokenMetric(None)


# -- sampling ---------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens: a `tokenizers.Tokenizer` or a Hugging Face
    tokenizer."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoded, "ids", encoded))


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    eos_id: int = EOS_ID,
) -> list[str]:
    """One sampled continuation per prompt (the new text only, decoded), for reports.

    Pure sampling from softmax(logits / `temperature`) of the next token, one token at a time,
    from ``<eos>`` + the prompt's tokens (a prompt then starts a document, as every KJV chapter
    does in training), for at most `max_new_tokens` tokens or until ``<eos>`` is drawn (not
    included). Each prompt's draws come from a `torch.Generator` seeded with `seed`, so a prompt
    gets the same continuation whatever the other prompts, and teacher / students sampled with the
    same seed share their random numbers. The model runs in eval mode (its mode is restored
    afterwards), without gradients; a context longer than the model's positions keeps the
    latest tokens. Deterministic for a given model, seed and device.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (pure sampling), got {temperature}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    limit = context_limit(model)
    was_training = model.training
    model.eval()
    results = []
    try:
        for prompt in prompts:
            generator = torch.Generator().manual_seed(seed)
            ids = [eos_id, *_encode(tokenizer, prompt)]
            new: list[int] = []
            for _ in range(max_new_tokens):
                context = (ids + new)[-limit:] if limit else ids + new
                input_ids = torch.tensor([context], device=device)
                logits = logits_of(
                    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
                )
                probs = torch.softmax(logits[0, -1].double().cpu() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                if token == eos_id:
                    break
                new.append(token)
            results.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return results
