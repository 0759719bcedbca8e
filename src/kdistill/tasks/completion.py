"""Prompt → completion: the language-modelling metrics on the completion tokens only.

The data is `kdistill.data.completions.PromptCompletions` (labels −100 on each prompt, the
completion's tokens and its ``<eos>`` counted); the metrics are `NextTokenMetric`'s — NLL,
perplexity, next-token accuracy and bits per byte of the **reference completions** given their
prompts — and the student alone learns with next-token cross-entropy on those completions. The
report shows, for a few held-out prompts, the reference and each model's sampled completion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdistill.data.completions import KJV_COMPLETIONS_DATASET, PromptCompletions
from kdistill.distill.onpolicy import generate_completions
from kdistill.tasks.language_modeling import LanguageModelingTask

__all__ = ["CompletionTask"]


class CompletionTask(LanguageModelingTask):
    """Causal LM on prompt → completion sequences (`PromptCompletions`)."""

    name = "completion"
    target = "completions"
    default_data = KJV_COMPLETIONS_DATASET
    eval_batch_size = 64
    report_prompts = 4  # held-out prompts shown in the report
    sample_temperature = 0.8
    sample_max_new_tokens = 40

    def prepare(self, data: Any) -> PromptCompletions:
        if not isinstance(data, PromptCompletions):
            name = getattr(data, "name", type(data).__name__)
            raise ValueError(
                f"task completion: dataset {name!r} is not prompt → completion text; it needs "
                "kdistill.data.completions.PromptCompletions: use data.dataset: "
                f"{KJV_COMPLETIONS_DATASET}, or a factory returning PromptCompletions"
            )
        return data

    def report_section(self, models: Mapping[str, nn.Module], splits: Any) -> list[str]:
        """Markdown: for the first `report_prompts` test prompts, the reference completion and
        each model's sample (temperature `sample_temperature`, no top-k / top-p, the same seed
        for every model)."""
        tokenizer = getattr(splits, "tokenizer", None)
        test = getattr(splits, "test", None)
        if tokenizer is None or not isinstance(test, PromptCompletions) or not models:
            return []
        count = min(self.report_prompts, len(test))
        prompts = test.prompts()[:count]
        vocab = test.vocab_size
        lines = [
            "## Sampled completions (held-out prompts)",
            "",
            f"Each model samples at temperature {self.sample_temperature:g} (no top-k / top-p, "
            f"at most {self.sample_max_new_tokens} tokens, stopped at the completion's end "
            "token), seed 0 for all.",
        ]
        samples = {
            label: generate_completions(
                model,
                prompts,
                max_new_tokens=self.sample_max_new_tokens,
                temperature=self.sample_temperature,
                seed=0,
                vocab_size=vocab,
                eos_id=test.end_id,
            )
            for label, model in models.items()
        }
        for row in range(count):
            prompt = tokenizer.decode(prompts[row].tolist(), skip_special_tokens=True)
            reference = test.texts[row][1] if test.texts else ""
            lines += ["", f"**{_cell(prompt)} …**", "", "| model | completion |", "|---|---|"]
            lines.append(f"| reference | {_cell(reference)} |")
            for label, completions in samples.items():
                text = tokenizer.decode(completions[row].tolist(), skip_special_tokens=True)
                lines.append(f"| {label} | {_cell(text)} |")
        return lines


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
