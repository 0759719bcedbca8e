"""The teacher's steps of a run (a part of `recipes.runner.Experiment`): where the teacher comes
from (given, reused from a run with the same identity, or trained), the check of a teacher the
run did not train, and its outputs over the training split (memory, disk, top-k tokens)."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from kdistill.data import (
    BatchLoader,
)
from kdistill.distill.distiller import Distiller
from kdistill.distill.teacher.store import (
    MemoryTeacherOutputs,
    TeacherCache,
    TokenTeacherCache,
    build_teacher_cache,
    build_token_cache,
    build_view_cache,
    loader_views,
)
from kdistill.engine import fit
from kdistill.engine.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    read_checkpoint_file,
    save_checkpoint,
)
from kdistill.engine.distributed import barrier
from kdistill.errors import CacheError
from kdistill.models import count_parameters
from kdistill.models.specs import pretrained_folder
from kdistill.recipes.plan import teacher_store
from kdistill.recipes.run_store import RunRecord, describe_metrics, saved_teacher_matches
from kdistill.recipes.schema import (
    TeacherSpec,
    TokenCacheSpec,
)
from kdistill.recipes.splits import build_model, load_teacher_checkpoint
from kdistill.recipes.teacher_check import check_input_reading, check_stored_normalization
from kdistill.tasks import (
    evaluate,
)


class TeacherSteps:
    """The teacher's part of an `Experiment` (which holds `recipe`, `plan`, `task`, `splits`,
    `out_dir`, loaders and evaluators)."""

    def teacher_identity(self) -> dict:
        """What a teacher saved by a run must match to be reused (`recipes.plan`)."""
        return self.plan.teacher.identity

    def teacher_store(self) -> Path:
        """``<parent of the run folder>/teachers/<digest of the identity>`` (`recipes.plan`)."""
        return teacher_store(self.plan, self.out_dir)

    def prepare_teacher(self) -> tuple[nn.Module, RunRecord]:
        spec: TeacherSpec = self.recipe.teacher
        teacher = build_model(spec, self.splits.train, self.recipe.seed, self.task)
        models_dir = self.out_dir / "models"
        identity = self.teacher_identity()
        started = time.perf_counter()
        loaded = self.load_given_teacher(teacher)
        if loaded is not None and not spec.fine_tune:
            self.check_loaded_teacher(teacher, loaded)
        elif loaded is None and saved_teacher_matches(models_dir, identity):
            tensors, _ = load_checkpoint(models_dir, "teacher")
            load_weights(teacher, tensors, "teacher", str(checkpoint_path(models_dir, "teacher")))
            self.say(f"teacher: loaded {models_dir / 'teacher.safetensors'} (same recipe and data)")
        elif loaded is None and saved_teacher_matches(self.teacher_store(), identity):
            store = checkpoint_path(self.teacher_store(), "teacher")
            tensors, _ = read_checkpoint_file(store)
            load_weights(teacher, tensors, "teacher", str(store))
            if self.is_main:  # the run folder stays complete on its own
                save_checkpoint(models_dir, "teacher", teacher.state_dict(), self._teacher_state())
            self.say(
                f"teacher: reused {store} (trained by a run with the same teacher, training, "
                "data and seed)"
            )
        else:
            self.train_teacher(teacher, keep=loaded is None)
        teacher.eval()
        metrics = self.evaluator(self.splits.test)(teacher)
        val_metrics = self.evaluator(self.splits.val)(teacher)
        record = RunRecord(
            "teacher",
            None,
            "teacher",
            self.recipe.seed,
            count_parameters(teacher),
            metrics[self.metric],
            seconds=time.perf_counter() - started,
            cost=self.cost_of("teacher", teacher),
            test_metrics=metrics,
            val_metrics=val_metrics,
        )
        self.say(f"teacher: test {describe_metrics(metrics)}")
        self.teacher = teacher
        self.teacher_train_outputs = self.prepare_teacher_outputs(teacher)
        return teacher, record

    def _teacher_state(self) -> dict:
        """What a saved teacher keeps beside its weights: its identity, and the normalisation
        of the inputs it was trained on (checked when a recipe loads it again)."""
        return {"identity": self.teacher_identity(), "normalization": self.splits.normalization}

    def load_given_teacher(self, teacher: nn.Module) -> str | None:
        """Load the trained weights the recipe gives (`teacher.checkpoint`; an `hf:<folder>`
        comes loaded); returns where they came from, or None when the teacher is not given."""
        spec: TeacherSpec = self.recipe.teacher
        if spec.checkpoint is not None:
            check_stored_normalization(spec.checkpoint, self.splits.normalization)
            load_teacher_checkpoint(spec, teacher)
            self.say(f"teacher: loaded {spec.checkpoint}")
            return f"teacher.checkpoint {spec.checkpoint}"
        if pretrained_folder(spec.model) is not None:
            self.say(f"teacher: loaded {spec.model} (its own trained weights)")
            return f"teacher.model {spec.model}"
        return None

    def check_loaded_teacher(self, teacher: nn.Module, source: str) -> dict[str, float]:
        """A teacher the run did not train, scored on the validation split as the recipe reads
        it and read the other way; refused when the other way is markedly better
        (`recipes.teacher_check.check_input_reading`)."""
        teacher.eval()
        device = self.recipe.train.device
        scores = check_input_reading(
            self.task,
            lambda data: evaluate(
                teacher, self.loader(data, 0, self.eval_batch, shuffle=False), self.task, device
            ),
            self.splits.val,
            str(self.splits.normalization.get("mode", "none")),
            self.splits.other_val,
            source,
        )
        self.say(
            "teacher: validation "
            + ", ".join(f"{value:.4f} ({mode})" for mode, value in scores.items())
        )
        return scores

    def train_teacher(self, teacher: nn.Module, keep: bool = True) -> None:
        """Train the teacher with `teacher.train` (after loading it, with `teacher.fine_tune`);
        saved in the run folder, and with `keep` in the store other recipes reuse."""
        spec: TeacherSpec = self.recipe.teacher
        self.say(f"teacher: training {spec.model} ({count_parameters(teacher):,} parameters)")
        config = self.train_config(spec.train)
        fit(
            Distiller(None, teacher, self.objective(None)),
            self.augmented_loader(
                self.splits.train, self.recipe.seed, config.batch_size, spec.augment
            ),
            config,
            evaluate=self.evaluator(self.splits.val),
            label="teacher",
            metrics_log=self.metrics,
            checkpoint_dir=self.out_dir / "checkpoints" / "teacher",
            resume=self.resume,
            loggers=self.trackers,
        )
        if self.is_main:
            state = self._teacher_state()
            save_checkpoint(self.out_dir / "models", "teacher", teacher.state_dict(), state)
            if keep:
                save_checkpoint(self.teacher_store(), "teacher", teacher.state_dict(), state)

    def teacher_layers(self) -> list[str]:
        """Every teacher layer a method of the recipe taps, in first-use order."""
        layers = [t.teacher for terms in self.recipe.distill.methods.values() for t in terms]
        return list(dict.fromkeys(layer for layer in layers if layer is not None))

    def prepare_teacher_outputs(
        self, teacher: nn.Module
    ) -> MemoryTeacherOutputs | TeacherCache | TokenTeacherCache | None:
        """The teacher's training-set outputs as `distill.teacher_cache` asks: in memory (logits),
        on disk (`<run>/teacher_cache`, reused while teacher, data and settings match), its
        top-k token distributions on disk (a `TokenCacheSpec`), or none. All carry the training
        inputs' signatures: every batch is checked against them."""
        distill = self.recipe.distill
        if isinstance(distill.teacher_cache, TokenCacheSpec):
            return self.prepare_token_cache(teacher, distill.teacher_cache)
        if distill.teacher_cache == "memory":
            views = self.views_loader()
            return MemoryTeacherOutputs.predict(
                teacher,
                views or self.loader(self.splits.train, 0, self.eval_batch, shuffle=False),
                self.recipe.train.device,
                epochs=None if views is None else self.view_epochs(),
            )
        if distill.teacher_cache == "off":
            return None
        cache = None
        if self.is_main:  # under torchrun rank 0 builds it; the other ranks wait, then read it
            cache, _ = self.disk_teacher_cache(teacher)
        barrier()
        if cache is None:
            wanted = self._cache_wanted(self.views_loader())
            cache = TeacherCache.open(
                self.out_dir / "teacher_cache", teacher, self.splits.train, **wanted
            )
        return cache

    def views_loader(self) -> BatchLoader | None:
        """With `data.augment`: the first seed's student loader, whose batches the teacher's
        stored views are built from (that run replays them bit for bit); otherwise None."""
        if self.recipe.data.augment is None:
            return None
        return self.student_loader(
            self.splits.train, self.recipe.seed, self.recipe.train.batch_size
        )

    def _cache_wanted(
        self,
        views: BatchLoader | None,
        layers: list[str] | None = None,
        dtype: str | None = None,
        topk: int | None = None,
    ) -> dict:
        """What a stored cache must match: layers, dtype, top-k (the recipe's unless given) and,
        with `views` (the loader of `views_loader`), the views of `view_epochs()` epochs."""
        distill = self.recipe.distill
        return {
            "layers": self.teacher_layers() if layers is None else layers,
            "dtype": dtype or distill.teacher_cache_dtype,
            "topk": distill.teacher_cache_topk if topk is None else topk,
            "views": None
            if views is None
            else {"epochs": self.view_epochs(), **loader_views(views)},
        }

    def disk_teacher_cache(
        self,
        teacher: nn.Module,
        directory: Path | None = None,
        *,
        layers: list[str] | None = None,
        dtype: str | None = None,
        topk: int | None = None,
        force: bool = False,
    ) -> tuple[TeacherCache, bool]:
        """The teacher's outputs over the training split in `directory` (default
        `<run>/teacher_cache`): with `data.augment`, on every view of `view_epochs()` epochs
        (`build_view_cache`), else on the plain samples (`build_teacher_cache`); `layers`,
        `dtype`, `topk` default to the recipe's. Reused while teacher, data and settings match
        (unless `force`), built otherwise. Returns the cache and whether it was built."""
        directory = self.out_dir / "teacher_cache" if directory is None else Path(directory)
        views = self.views_loader()
        wanted = self._cache_wanted(views, layers, dtype, topk)
        if not force:
            try:
                cache = TeacherCache.open(directory, teacher, self.splits.train, **wanted)
                self.say(f"teacher cache: reusing {directory}")
                return cache, False
            except CacheError as error:
                if (directory / "manifest.json").exists():
                    self.say(f"teacher cache: rebuilding ({error})")
        settings = {name: wanted[name] for name in ("layers", "dtype", "topk")}
        if views is not None:
            cache = build_view_cache(
                teacher,
                views,
                directory,
                wanted["views"]["epochs"],
                progress=self.progress,
                **settings,
            )
        else:
            cache = build_teacher_cache(
                teacher,
                self.splits.train,
                directory,
                batch_size=self.eval_batch,
                progress=self.progress,
                **settings,
            )
        self.say(cache.describe())
        return cache, True

    def prepare_token_cache(self, teacher: nn.Module, spec: TokenCacheSpec) -> TokenTeacherCache:
        """The teacher's top-k next-token distributions over the training blocks in
        `<run>/teacher_cache` (`kdistill.cache.tokens`), reused while teacher, data, k, T and
        dtype match; rank 0 builds, the other ranks wait and read."""
        directory = self.out_dir / "teacher_cache"
        wanted = {"topk": spec.topk, "temperature": spec.temperature, "dtype": spec.dtype}
        cache = None
        if self.is_main:
            try:
                cache = TokenTeacherCache.open(directory, teacher, self.splits.train, **wanted)
                self.say(f"teacher cache: reusing {directory}")
            except CacheError as error:
                if (directory / "manifest.json").exists():
                    self.say(f"teacher cache: rebuilding ({error})")
                cache = build_token_cache(
                    teacher,
                    self.splits.train,
                    directory,
                    batch_size=self.eval_batch,
                    output=self.task.model_output,
                    measure_positions=spec.measure_positions,
                    progress=self.progress,
                    **wanted,
                )
                self.say(cache.describe())
        barrier()
        if cache is None:
            cache = TokenTeacherCache.open(directory, teacher, self.splits.train, **wanted)
        return cache
