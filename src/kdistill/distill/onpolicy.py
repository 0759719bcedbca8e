"""Training on generated completions: on-policy (GKD) batches and sequence-level KD data.

**On-policy / mixed data** — GKD, Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (ICLR 2024), Algorithm 1. With probability λ
(`lmbda`) a training batch of prompt → completion sequences has its completions replaced by the
**student's** samples; the loss (any token divergence, the teacher scoring the new sequences)
then trains the student on its own mistakes. λ = 0 is supervised KD on the data's completions,
λ = 1 is fully on-policy. `OnPolicy.apply` does it for one batch:

- the coin and the sampling seed come from a `torch.Generator` seeded by (`seed`, `key`), where
  the engine's key is the batch's position in training (epoch · batches per epoch + batch): a
  resumed run draws the same coins and the same samples, and the global RNG is left untouched;
- prompt of row i = its tokens before the first counted label (labels ≠ −100); they must all be
  real tokens (attention 1: right-padded data, `kdistill.data.completions`);
- the student samples in eval mode without gradients (its mode is restored after): pure
  sampling from softmax(logits / `temperature`) — no top-k, no top-p — for at most
  `max_new_tokens` tokens, stopping at ``<eos>`` (kept: it is a counted target);
- the new batch is right-padded: labels −100 on the prompt and on everything after the
  ``<eos>`` (or after the last sampled token), attention 0 there too. So no padding position is
  ever counted (the token losses refuse one), and the prompt never is.

Hugging Face models sample with ``generate`` (``do_sample=True, top_k=0, top_p=1.0``,
prompts padded on the **left**, KV cache), seeded through `torch.random.fork_rng`, against a
fresh ``GenerationConfig`` (the model's own ``generation_config`` — min_p, typical_p,
suppress_tokens, no_repeat_ngram_size, … — is set aside during the call and logged once as
ignored; transformers ≥ 5 would otherwise fill every unset field from it). Once per model and
mode, a probe on the first prompt checks that the scores ``generate`` decodes from are the raw
logits / T (greedy: the logits); anything else changing them (the model's own ``generate``, a
logits processor) is refused with a ConfigError. Any other
model returning logits ``N×L×V`` (a tensor or a mapping with ``"logits"``), called as
``model(input_ids=…, attention_mask=…)``, samples with a plain loop (right-padded, no cache:
position i reads only positions ≤ i of a causal model, so each row's next token is read at its
own last real position) and a seeded generator. `generate_completions` is that one function.

**Sequence-level KD** — Kim & Rush 2016, "Sequence-Level Knowledge Distillation" (EMNLP): the
teacher decodes a completion of every training prompt once, **greedily** (beam size 1, the
paper's cheaper approximation of its beam search), and the student trains on those sequences as
its data (cross-entropy, optionally plus a token-level divergence). `teacher_sequences` stores
them in a folder, keyed by the teacher's weights (sha256 of its state dict), the prompts and
completions of the data (its fingerprint) and the decoding settings, and reuses them while all
three match; any difference regenerates them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.arrays import Batch
from kdistill.data.completions import sequences_from_parts
from kdistill.data.text import EOS_ID, IGNORE_INDEX, PAD_ID
from kdistill.errors import ConfigError, DataError
from kdistill.io import atomic_write_bytes, atomic_write_text, tensors_digest
from kdistill.models.lm import context_limit

__all__ = [
    "OnPolicy",
    "batch_prompts",
    "generate_completions",
    "sequences_batch",
    "teacher_sequences",
]

log = logging.getLogger(__name__)

SEQUENCES_FORMAT = 2  # bump when the stored layout or the decoding changes


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise TypeError(
        f"sampling needs the model's logits N×L×V: a tensor or a mapping with 'logits', got "
        f"{type(output).__name__}"
    )


def _uses_generate(model: nn.Module) -> bool:
    """A Hugging Face generation model (``generate`` and a ``config``)."""
    return callable(getattr(model, "generate", None)) and getattr(model, "config", None) is not None


def _head_rows(model: nn.Module) -> int | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _cut_at_eos(tokens: Tensor, eos_id: int) -> Tensor:
    """`tokens` up to and including the first `eos_id` (all of them when there is none)."""
    hits = torch.nonzero(tokens == eos_id)
    return tokens[: int(hits[0]) + 1] if len(hits) else tokens


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    vocab_size: int | None = None,
    use_generate: bool | None = None,
) -> list[Tensor]:
    """One completion per prompt: int64 tokens (on the CPU) that follow `prompts[i]` (int64
    1-D, at least one token), at most `max_new_tokens`, ending with `eos_id` when it was
    produced (nothing after it).

    Pure sampling from softmax(logits / `temperature`) (no top-k / top-p), or with `greedy` the
    argmax. The model runs in eval mode without gradients; its mode is restored. `seed` fixes the
    draws (the global RNG is not consumed). `vocab_size`: sample only ids below it (a head padded
    past the tokenizer). `use_generate`: Hugging Face ``generate`` (default: when the model has
    it and its head has no rows past `vocab_size`) or the plain loop. `eos_id`: the token that
    ends a completion (the data's `end_id`).

    ValueError for an empty prompt, a non-positive temperature or `max_new_tokens`, or prompts
    that with `max_new_tokens` exceed the model's positions.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if not greedy and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 (pure sampling), got {temperature}")
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token (e.g. the start token)")
    limit = context_limit(model)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's {limit} positions; lower max_new_tokens or shorten the prompts"
        )
    rows = _head_rows(model)
    if use_generate is None:
        use_generate = _uses_generate(model) and (
            vocab_size is None or rows is None or rows <= vocab_size
        )
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        if use_generate:
            new = _hf_generate(
                model, prompts, max_new_tokens, temperature, greedy, seed, eos_id, pad_id, device
            )
        else:
            new = _sampling_loop(
                model, prompts, max_new_tokens, temperature, greedy, seed, eos_id, pad_id,
                vocab_size, device,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return [_cut_at_eos(tokens, eos_id) for tokens in new]


def _hf_generate(model, prompts, max_new_tokens, temperature, greedy, seed, eos_id, pad_id, device):
    """Hugging Face ``generate`` on left-padded prompts; the new tokens of each row."""
    import transformers

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    sampling = {} if greedy else {"temperature": float(temperature), "top_k": 0, "top_p": 1.0}
    config = transformers.GenerationConfig(
        do_sample=not greedy,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        repetition_penalty=1.0,
        **sampling,
    )
    devices = [device] if device.type == "cuda" else []
    # transformers ≥ 5 fills every field the caller leaves unset from model.generation_config
    # (min_p, typical_p, suppress_tokens, no_repeat_ngram_size, …): generate against a fresh
    # one, so that only what kdistill states applies (issue 27)
    own = getattr(model, "generation_config", None)
    _report_ignored_settings(model, own, transformers)
    try:
        model.generation_config = transformers.GenerationConfig()
        if not _verified(model, greedy):
            _verify_pure(model, prompts[0], config, temperature, greedy, seed, device, devices)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
    finally:
        if own is not None:
            model.generation_config = own
    sequences = output if isinstance(output, Tensor) else output.sequences
    return list(sequences[:, width:].cpu())


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_META_FIELDS = {"transformers_version", "_from_model_config", "bos_token_id", "eos_token_id"}
_META_FIELDS |= {"pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens"}


def _verified(model: nn.Module, greedy: bool) -> bool:
    return greedy in _VERIFIED.get(model, set())


def _report_ignored_settings(model: nn.Module, own: Any, transformers: Any) -> None:
    """Log once per model the generation settings of its own that kdistill does not apply."""
    if own is None or model in _REPORTED:
        return
    _REPORTED[model] = True
    try:
        mine, default = own.to_dict(), transformers.GenerationConfig().to_dict()
    except Exception:  # noqa: BLE001 - an odd config: nothing to report
        return
    ignored = {
        key: value
        for key, value in mine.items()
        if key not in _META_FIELDS and key in default and default[key] != value
    }
    if ignored:
        log.warning(
            "%s.generation_config sets %s: kdistill ignores them (on-policy samples are pure "
            "sampling at the configured temperature, sequence-level KD decodes greedily)",
            type(model).__name__,
            ", ".join(f"{key}={value!r}" for key, value in sorted(ignored.items())),
        )


def _verify_pure(model, prompt, config, temperature, greedy, seed, device, devices) -> None:
    """Run ``generate`` once on `prompt` with the scores it samples from and the raw logits;
    ConfigError when the scores are not logits / T (sampling) or the logits (greedy) at every
    step: something (the model's own ``generate``, a logits processor) changes the
    distribution. Once per model and mode."""
    probe = copy.deepcopy(config)
    probe.return_dict_in_generate = True
    probe.output_scores = True
    probe.output_logits = True
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=prompt[None].to(device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device=device),
            generation_config=probe,
        )
    scores = getattr(output, "scores", None)
    logits = getattr(output, "logits", None)
    what = "greedy decoding (the argmax)" if greedy else f"pure sampling at T = {temperature}"
    if not scores or not logits or len(scores) != len(logits):
        raise ConfigError(
            f"{type(model).__name__}.generate did not return the scores it decodes from and the "
            f"raw logits (return_dict_in_generate, output_scores, output_logits), so kdistill "
            f"cannot verify that it does {what}; use the plain loop (use_generate=False)"
        )
    for step, (score, logit) in enumerate(zip(scores, logits)):
        expected = logit.float() if greedy else logit.float() / float(temperature)
        same = (score == expected) | torch.isclose(score.float(), expected, rtol=1e-5, atol=1e-6)
        if not bool(same.all()):
            tokens = torch.nonzero(~same[0]).reshape(-1)[:8].tolist()
            raise ConfigError(
                f"{type(model).__name__}.generate changes the distribution: at step {step + 1} "
                f"the scores of tokens {tokens} are not the model's logits"
                f"{'' if greedy else ' / T'} (a logits processor kdistill did not ask for, "
                f"e.g. from the model's own generate); kdistill needs {what}: remove it, or "
                "sample with the plain loop (generate_completions(..., use_generate=False))"
            )
    _VERIFIED.setdefault(model, set()).add(greedy)


def _sampling_loop(
    model, prompts, max_new_tokens, temperature, greedy, seed, eos_id, pad_id, vocab_size, device
):
    """The plain loop: right-padded rows, the whole prefix recomputed each step."""
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max()) + max_new_tokens
    input_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((n, width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = prompt
        attention_mask[row, : len(prompt)] = 1
    start = lengths.clone()
    done = torch.zeros(n, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    for _ in range(max_new_tokens):
        columns = int(lengths.max())
        output = model(
            input_ids=input_ids[:, :columns].to(device),
            attention_mask=attention_mask[:, :columns].to(device),
        )
        logits = _logits(output)[rows.to(device), (lengths - 1).to(device)].double().cpu()
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        if greedy:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).reshape(-1)
        active = ~done
        input_ids[rows[active], lengths[active]] = token[active]
        attention_mask[rows[active], lengths[active]] = 1
        lengths = lengths + active.long()
        done = done | (active & (token == eos_id))
        if bool(done.all()):
            break
    return [input_ids[row, int(start[row]) : int(lengths[row])] for row in range(n)]


# -- on-policy batches --------------------------------------------------------------------------
def batch_prompts(inputs: Any, labels: Tensor) -> list[Tensor]:
    """Each row's prompt: its tokens before the first counted label (labels ≠ −100).

    DataError (naming the row) for inputs that are not a dict with ``input_ids`` ``N×L`` (and
    ``attention_mask``, optional) and labels ``N×L``, a row without a counted label, or a prompt
    holding padding (attention 0: the data must be right-padded)."""
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), Tensor):
        raise DataError(
            "on-policy batches need dict inputs with input_ids (prompt → completion data, "
            "e.g. kdistill.data.completions.PromptCompletions)"
        )
    extra = sorted(set(inputs) - {"input_ids", "attention_mask"})
    if extra:
        raise DataError(
            f"on-policy batches replace input_ids and attention_mask; the batch also has {extra}, "
            "which would no longer match the sampled sequences"
        )
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if not isinstance(labels, Tensor) or labels.shape != input_ids.shape or labels.dim() != 2:
        raise DataError(
            f"on-policy batches need labels N×L like input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    counted = labels != IGNORE_INDEX
    if not bool(counted.any(dim=1).all()):
        row = int(torch.nonzero(~counted.any(dim=1))[0])
        raise DataError(
            f"on-policy: row {row} of the batch has no counted label, so its prompt is unknown "
            "(labels −100 on the prompt, the completion's tokens after it)"
        )
    starts = counted.long().argmax(dim=1)
    prompts = []
    for row, start in enumerate(starts.tolist()):
        if start < 1:
            raise DataError(f"on-policy: row {row} has an empty prompt (its first label counts)")
        if mask is not None and not bool((mask[row, :start] != 0).all()):
            raise DataError(
                f"on-policy: row {row}'s prompt holds padding (attention 0); pad on the right"
            )
        prompts.append(input_ids[row, :start].detach().cpu())
    return prompts


def sequences_batch(prompts: Sequence[Tensor], completions: Sequence[Tensor], index) -> Batch:
    """A right-padded `Batch` of prompt + completion rows: attention 1 on both, labels on the
    completion only (−100 on the prompt and the padding)."""
    input_ids, attention_mask, labels = sequences_from_parts(prompts, completions)
    if input_ids.shape[1] < 2:
        input_ids, attention_mask, labels = sequences_from_parts(prompts, completions, width=2)
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask}, labels, index)


def _keyed_generator(seed: int, key: int) -> torch.Generator:
    digest = hashlib.sha256(f"kdistill-on-policy:{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class OnPolicy:
    """GKD's mixed data (see the module doc): with probability `lmbda` a batch's completions
    are the student's samples at `temperature`, at most `max_new_tokens` long. `vocab_size`:
    sample only ids below it (heads padded past the tokenizer)."""

    lmbda: float
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0
    vocab_size: int | None = None
    eos_id: int = EOS_ID  # the token that ends a completion (kept, counted)

    def __post_init__(self) -> None:
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"on_policy.lmbda must lie in [0, 1], got {self.lmbda}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"on_policy.temperature must be > 0, got {self.temperature}")
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"on_policy.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")

    def draw(self, key: int) -> tuple[bool, int]:
        """(sample this batch?, the sampling seed) for the batch keyed `key`: a fixed function
        of (`seed`, `key`). λ = 0 never samples, λ = 1 always does."""
        generator = _keyed_generator(self.seed, key)
        coin = float(torch.rand((), generator=generator, dtype=torch.float64))
        sampling_seed = int(torch.randint(0, 2**62, (), generator=generator))
        return coin < self.lmbda, sampling_seed

    def apply(
        self, student: nn.Module, batch: Batch, key: int, rank: int = 0
    ) -> tuple[Batch, bool]:
        """`batch` as it is, or (probability λ) with the student's completions; and whether it
        sampled. See the module doc for the layout of the new batch. `rank`: under DDP every
        rank draws the same coin for a key (all sample or none) but its own samples."""
        sample, sampling_seed = self.draw(key)
        sampling_seed = (sampling_seed + rank) % 2**63
        if not sample:
            return batch, False
        prompts = batch_prompts(batch.inputs, batch.target)
        completions = generate_completions(
            student,
            prompts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=sampling_seed,
            vocab_size=self.vocab_size,
            eos_id=self.eos_id,
        )
        return sequences_batch(prompts, completions, batch.index), True


# -- sequence-level KD --------------------------------------------------------------------------
def teacher_sequences(
    teacher: nn.Module,
    data: Any,
    directory: str | Path,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> tuple[Any, str]:
    """(`data` with the teacher's greedy completions of its prompts, what happened).

    `data`: prompt → completion data with ``prompts()``, ``with_sequences(completions, name)``
    and ``fingerprint()`` (`kdistill.data.completions.PromptCompletions`). The completions are
    stored in `directory` (``sequences-<key>.safetensors`` + ``.json``), the key a sha256 of
    the teacher's state dict, the data's fingerprint and the settings; they are reused while
    the key and the file's own digest match, and regenerated otherwise."""
    import safetensors.torch

    directory = Path(directory)
    eos_id = int(getattr(data, "end_id", EOS_ID))
    settings = {
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "vocab_size": vocab_size,
        "end_id": eos_id,
    }
    identity = {
        "format": SEQUENCES_FORMAT,
        "teacher_sha256": tensors_digest(teacher.state_dict()),
        "data_sha256": data.fingerprint(),
        "settings": settings,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    path = directory / f"sequences-{key[:16]}.safetensors"
    meta_path = path.with_suffix(".json")
    name = f"{getattr(data, 'name', 'data')}-teacher-greedy"
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            blob = path.read_bytes()
            if meta.get("key") == key and meta.get("sha256") == hashlib.sha256(blob).hexdigest():
                stored = safetensors.torch.load(blob)
                completions = list(torch.split(stored["tokens"], stored["lengths"].tolist()))
                return data.with_sequences(completions, name), f"reused {path}"
        except (OSError, ValueError):
            pass  # unreadable: generated again below
    prompts = data.prompts()
    completions: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        completions += generate_completions(
            teacher,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            greedy=True,
            vocab_size=vocab_size,
            eos_id=eos_id,
        )
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.int64)
    tokens = torch.cat(completions) if completions else torch.zeros(0, dtype=torch.int64)
    blob = safetensors.torch.save({"tokens": tokens.contiguous(), "lengths": lengths})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    meta = {**identity, "key": key, "sha256": hashlib.sha256(blob).hexdigest()}
    with_eos = int(sum(1 for c in completions if len(c) and int(c[-1]) == eos_id))
    meta["ended_with_eos"] = with_eos
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    status = (
        f"generated {len(completions)} greedy teacher completions ({with_eos} ended with the end "
        f"token {eos_id}, "
        f"mean {float(lengths.double().mean()):.1f} tokens) into {path}"
    )
    return data.with_sequences(completions, name), status
