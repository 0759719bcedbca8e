"""The students' steps of a run (a part of `recipes.runner.Experiment`): each student's data,
initial weights and training (alone or distilled, generated data included), and the choice of
settings on the validation split."""

from __future__ import annotations

import json

from torch import nn

from kdistill.data import (
    hide_labels,
    repeat_to,
)
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.model_output import pick_output, picked_output
from kdistill.distill.onpolicy import teacher_sequences
from kdistill.distill.teacher.sequences import TeacherSequences
from kdistill.distill.teacher.store import (
    offline_teacher_outputs,
)
from kdistill.distill.transforms import on_policy_transform
from kdistill.engine import TrainConfig, fit
from kdistill.engine.checkpoint import (
    atomic_write_text,
    load_whole_model,
)
from kdistill.recipes.objective import grid_settings, settings_label
from kdistill.recipes.run_store import describe_metrics
from kdistill.recipes.schema import (
    ModelSpec,
)
from kdistill.recipes.splits import Data, build_model, model_label
from kdistill.tasks import (
    best,
)


class StudentSteps:
    """The students' part of an `Experiment`."""

    def student_data(self, spec: ModelSpec, seed: int, uses_teacher: bool) -> Data:
        """The training data of a student: the training split, or for a label-scarce student
        (`labelled: n`) the split with all but n (stratified, drawn by `seed`) labels hidden
        when it learns from the teacher, or those n labelled images alone — repeated to the
        split's size, so that it takes the same steps per epoch — when it does not."""
        labelled = getattr(spec, "labelled", None)
        if labelled is None:
            return self.splits.train
        train = self.splits.train
        scarce, kept = hide_labels(train, labelled, seed)
        if uses_teacher:
            return scarce
        return repeat_to(train.subset(kept, name=f"{train.name}-labelled{labelled}"), len(train))

    def train_student(
        self,
        label: str,
        spec: ModelSpec,
        seed: int,
        terms: list[Term],
        method: str,
        evaluate_on: Data,
        epochs: int | None = None,
        keep_checkpoint: bool = True,
        student: nn.Module | None = None,
        train: TrainConfig | None = None,
    ) -> tuple[nn.Module, dict[str, float], dict[str, float]]:
        """Train one student; returns it, its metrics on `evaluate_on` after the last epoch and
        its metrics on the validation split after the last epoch.

        `student`: train this model instead of building `spec`'s (e.g. a pruned teacher);
        `train`: its budget instead of the recipe's `train`.
        """
        if student is None:
            student = self.initial_student(spec, seed)
        uses_teacher = any(term.uses_teacher for term in terms)
        distiller = Distiller(
            self.teacher if uses_teacher else None,
            student,
            terms,
            teacher_speedup=self.recipe.distill.teacher_speedup if uses_teacher else None,
        )
        tapped = [t.teacher for t in terms if t.uses_teacher and t.teacher is not None]
        config = self.train_config(train or self.recipe.train, epochs)
        data = self.student_data(spec, seed, uses_teacher)
        distill = self.recipe.distill
        generated = method in distill.on_policy or method in distill.sequence_level
        transforms = []
        if method in distill.sequence_level:
            data = self.splits.train  # the prompts the teacher completed, in their order
            transforms.append(TeacherSequences(self.sequence_level_data(method)))
        loader = self.student_loader(data, seed, config.batch_size)
        if method in distill.on_policy:
            on_policy = distill.on_policy[method]
            if on_policy.seed is not None:  # a fixed seed still differs from seed to seed
                offset = seed - self.recipe.seed
                on_policy = on_policy.model_copy(update={"seed": on_policy.seed + offset})
            transforms.append(on_policy_transform(on_policy, loader))
        try:
            result = fit(
                distiller,
                loader,
                config,
                evaluate=self.evaluator(self.splits.val),
                label=label,
                metrics_log=self.metrics,
                checkpoint_dir=self.out_dir / "checkpoints" / label if keep_checkpoint else None,
                resume=self.resume and keep_checkpoint,
                teacher_outputs=offline_teacher_outputs(
                    self.teacher_train_outputs if uses_teacher and not generated else None,
                    loader,
                    label,
                    tapped,
                ),
                loggers=self.trackers,
                batch_transforms=transforms,
            )
        finally:
            distiller.close()
        val_metrics = {
            key[len("val_") :]: value
            for key, value in result.final.items()
            if key.startswith("val_") and key != "val_loss"
        }
        if evaluate_on is self.splits.val and val_metrics:
            return student, val_metrics, val_metrics
        return student, self.evaluator(evaluate_on)(student), val_metrics

    def sequence_level_data(self, method: str) -> Data:
        """The training prompts with the teacher's completions (`distill.sequence_level`,
        Kim & Rush 2016), generated once into ``<run>/teacher_sequences`` and reused while the
        teacher, the data and the settings match (`kdistill.onpolicy.teacher_sequences`)."""
        spec = self.recipe.distill.sequence_level[method]
        if self.teacher is None:
            raise RuntimeError("sequence-level data needs the teacher: prepare_teacher() first")
        cached = self._sequences.get(method)
        if cached is None:
            train = self.splits.train
            cached, status = teacher_sequences(
                self.teacher.to(self.recipe.train.device),
                train,
                self.out_dir / "teacher_sequences",
                max_new_tokens=spec.max_new_tokens,
                batch_size=self.eval_batch,
                vocab_size=getattr(train, "vocab_size", None),
            )
            self.say(f"{method}: teacher sequences: {status}")
            self._sequences[method] = cached
        return cached

    def initial_student(self, spec: ModelSpec, seed: int) -> nn.Module:
        """`spec`'s model built with `seed`, or its `whole_model` file (the same weights for
        every seed: only the data order then differs)."""
        whole_model = getattr(spec, "whole_model", None)
        if whole_model is None:
            return build_model(spec, self.splits.train, seed, self.task)
        model = load_whole_model(whole_model, trust=spec.trust_checkpoint)
        if picked_output(model) is None:
            pick_output(model, spec.output, model_label(spec))
        return model

    def tune(self, spec, method: str) -> tuple[dict, list[dict]]:
        """The grid point with the best validation score (`metric`; ties: the first listed).

        Finished trials are recorded in `tuning.json`; `--resume` reuses them.
        """
        trials: list[dict] = []
        candidates = grid_settings(self.recipe, method)
        if len(candidates) == 1:
            return candidates[0], trials
        done = {trial["label"]: trial for trial in self._read_tuning()} if self.resume else {}
        for settings in candidates:
            label = f"tune/{spec.name}/{method}/{settings_label(settings)}"
            if label in done:
                trials.append(done[label])
                continue
            terms = self.objective(method, settings)
            _, val_metrics, _ = self.train_student(
                label,
                spec,
                self.recipe.tune.seed,
                terms,
                method,
                self.splits.val,
                epochs=self.recipe.tune.epochs,
                keep_checkpoint=False,
            )
            trial = {
                "label": label,
                "student": spec.name,
                "method": method,
                "settings": settings,
                "val_score": val_metrics[self.metric],
                "metric": self.metric,
            }
            trials.append(trial)
            self._record_tuning(trial)
            self.say(f"  {label}: validation {describe_metrics(val_metrics)}")
        chosen = best(self.task, self.metric, trials, key=lambda trial: trial["val_score"])
        return chosen["settings"], trials

    def _read_tuning(self) -> list[dict]:
        path = self.out_dir / "tuning.json"
        return json.loads(path.read_text()) if path.exists() else []

    def _record_tuning(self, trial: dict) -> None:
        if not self.is_main:
            return
        trials = [t for t in self._read_tuning() if t["label"] != trial["label"]] + [trial]
        atomic_write_text(self.out_dir / "tuning.json", json.dumps(trials, indent=1))
