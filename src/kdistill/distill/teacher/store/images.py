"""The image-output store, read side: `TeacherCache` (a finished, validated store on disk) and
the top-k storage of wide outputs (`encode_topk`, `rebuild_topk_logits`). Built by
`image_build`; the format is described in `kdistill.distill.teacher.store`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.distill.teacher.store.manifest import (
    MANIFEST,
    CachedTeacher,
    _file_digest,
    _from_storage,
    _short,
    _view_key,
    is_randomly_augmented,
    teacher_difference,
)
from kdistill.distill.teacher.store.signatures import InputSignatures, _EpochRows
from kdistill.errors import CacheError

FORMAT_VERSION = 2  # 2: input signatures (format 1 caches cannot be checked against the data)


def encode_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, indices, fill) of the top-k storage along dim 1 (see the package docstring).

    `fill` = logsumexp of the logits outside the top-k − log(K − k), one per sample (and per
    position for N×K×H×W outputs).
    """
    num_classes = logits.shape[1]
    if not 0 < k < num_classes:
        raise CacheError(
            f"topk must lie in [1, {num_classes - 1}] for an output with {num_classes} classes "
            f"on dim 1, got {k}; use dense storage (no topk) to keep every class"
        )
    values, indices = logits.topk(k, dim=1)
    tail = logits.scatter(1, indices, float("-inf"))
    fill = torch.logsumexp(tail.double(), dim=1) - math.log(num_classes - k)
    return values, indices, fill.to(logits.dtype)


def rebuild_topk_logits(values: Tensor, indices: Tensor, fill: Tensor, num_classes: int) -> Tensor:
    """Logits from top-k storage: `values` at `indices` along dim 1, `fill` everywhere else."""
    shape = list(values.shape)
    shape[1] = num_classes
    logits = fill.unsqueeze(1).expand(shape).clone()
    return logits.scatter_(1, indices.long(), values)


class TeacherCache(_EpochRows):
    """A finished, validated teacher cache; `lookup(index, inputs)` gives (output, {layer:
    features}) after checking that `inputs` are the samples the outputs were computed on.

    Open it with `TeacherCache.open`; it is a `TeacherSource`, so it
    is passed to `fit(..., teacher_outputs=cache)` as it is. A view cache
    (`build_view_cache`) holds `epochs` views per sample; `set_epoch` picks the epoch read.
    """

    def __init__(self, directory: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self._arrays = arrays
        self.size = int(manifest["dataset"]["size"])
        self.dtype = manifest["dtype"]
        self.views = manifest.get("views")
        self.epoch = 0
        self.source = f"teacher cache {directory}"
        self.signatures = InputSignatures(
            arrays[manifest["inputs"]["file"]],
            manifest["inputs"]["shape"],
            self.source,
        )

    # -- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        views = f", epochs={self.epochs}" if self.views is not None else ""
        return (
            f"TeacherCache({str(self.directory)!r}, size={self.size}, dtype={self.dtype}, "
            f"topk={self.topk}, layers={self.layers}{views})"
        )

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def topk(self) -> int | None:
        return self.manifest["topk"]

    @property
    def errors(self) -> dict[str, dict]:
        """Storage error of each entry against the float32 teacher outputs (see the package
        docstring, `kdistill.distill.teacher.store`)."""
        return self.manifest.get("errors", {})

    def stand_in(self) -> CachedTeacher:
        """A weightless teacher for `Distiller` when every output comes from this cache."""
        return CachedTeacher(self.layers)

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        teacher: nn.Module | None = None,
        dataset: Any = None,
        dtype: str | None = None,
        layers: Iterable[str] | None = None,
        topk: int | None | str = "any",
        verify: bool = False,
        views: Mapping | None | str = "any",
    ) -> TeacherCache:
        """Open and validate a cache; every argument given is checked against the manifest.

        `teacher`: its weights digest must match; `dataset`: its fingerprint; `dtype`: the
        storage dtype; `layers`: each must be cached (a cache may hold more); `topk`: the k
        (None = dense; the default "any" accepts both); `views`: None for a plain cache, or
        ``{"epochs": E, "augmentation": …, "seed": s}`` for views of that augmentation and
        seed over at least E epochs (default "any"). `verify` re-hashes every array file.
        Raises CacheError listing every difference.
        """
        directory = Path(directory)
        where = str(directory)
        rebuild = "rebuild it (kdistill cache, or build_teacher_cache) or delete the folder"
        manifest_path = directory / MANIFEST
        if not directory.is_dir():
            raise CacheError(f"{where}: no teacher cache here (no such folder)")
        if not manifest_path.exists():
            raise CacheError(
                f"{where}: no {MANIFEST}; not a teacher cache, or its build never got going; "
                f"{rebuild}"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CacheError(f"{manifest_path}: unreadable manifest ({error}); {rebuild}") from None
        if isinstance(manifest, dict) and manifest.get("kind") == "token_topk":
            raise CacheError(
                f"{where}: holds stored top-k token distributions, not teacher outputs; open "
                "it with kdistill.cache.TokenTeacherCache.open"
            )
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            why = (
                " (format 1 caches hold no input signatures, so they cannot be checked against "
                "the data they are used with)"
                if found == 1
                else ""
            )
            raise CacheError(
                f"{manifest_path}: cache format {found!r}, this kdistill reads "
                f"{FORMAT_VERSION}{why}; {rebuild}"
            )
        if manifest.get("complete") is not True:
            raise CacheError(
                f"{where}: incomplete teacher cache — its build did not finish (interrupted or "
                f"failed), so its arrays are partly empty; {rebuild}"
            )
        problems = cls._differences(manifest, teacher, dataset, dtype, layers, topk, views)
        if problems:
            raise CacheError(
                f"{where}: the teacher cache does not match: "
                + "; ".join(problems)
                + f"; {rebuild}"
            )
        arrays = cls._open_arrays(directory, manifest, verify)
        return cls(directory, manifest, arrays)

    @staticmethod
    def _differences(manifest, teacher, dataset, dtype, layers, topk, views="any") -> list[str]:
        problems = []
        held = manifest.get("views")
        if views != "any" and _view_key(views) != _view_key(held):
            problems.append(
                f"views differ (cache: {_view_key(held) or 'plain samples, no views'}; asked "
                f"for {_view_key(views) or 'plain samples, no views'})"
            )
        elif views not in ("any", None) and held["epochs"] < views["epochs"]:
            problems.append(
                f"the cache holds views of {held['epochs']} epoch(s), {views['epochs']} asked for"
            )
        stale = None if teacher is None else teacher_difference(manifest, teacher)
        if stale is not None:
            problems.append(stale)
        if dataset is not None:
            expected, actual = manifest["dataset"]["fingerprint"], dataset.fingerprint()
            if expected != actual:
                problems.append(
                    f"dataset differs (cache holds {manifest['dataset']['name']!r}, "
                    f"{manifest['dataset']['size']} samples, fingerprint {_short(expected)}; "
                    f"given {getattr(dataset, 'name', '?')!r}, {len(dataset)} samples, "
                    f"fingerprint {_short(actual)})"
                )
            if is_randomly_augmented(dataset):
                problems.append(
                    "the dataset applies random augmentation but the cache holds "
                    f"transforms: {manifest.get('transforms')!r}"
                )
        if dtype is not None and dtype != manifest["dtype"]:
            problems.append(f"dtype differs (cache stores {manifest['dtype']}, asked for {dtype})")
        if layers is not None:
            missing = [layer for layer in layers if layer not in manifest["layers"]]
            if missing:
                problems.append(
                    f"teacher layers {missing} are not cached (the cache holds "
                    f"{manifest['layers'] or 'no layers'})"
                )
        if topk != "any" and topk != manifest["topk"]:
            problems.append(
                f"top-k differs (cache: {manifest['topk'] or 'dense'}, asked for {topk or 'dense'})"
            )
        return problems

    @staticmethod
    def _open_arrays(directory: Path, manifest: dict, verify: bool) -> dict[str, np.ndarray]:
        """Every array file (outputs, features, input signatures) by file name, memory-mapped."""
        size = int(manifest["dataset"]["size"]) * int(manifest.get("views", {}).get("epochs", 1))
        files = [
            (file, spec["sha256"][file])
            for spec in manifest["entries"].values()
            for file in spec["files"]
        ]
        files.append((manifest["inputs"]["file"], manifest["inputs"]["sha256"]))
        arrays = {}
        for file, sha256 in files:
            path = directory / file
            if not path.exists():
                raise CacheError(f"{path}: missing array file of the teacher cache")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise CacheError(f"{path}: truncated or corrupt array file ({error})") from None
            if array.shape[:1] != (size,):
                raise CacheError(
                    f"{path}: holds {array.shape[0] if array.ndim else 0} rows, the manifest "
                    f"says {size}"
                )
            if verify and _file_digest(path) != sha256:
                raise CacheError(
                    f"{path}: checksum mismatch (the file changed after the cache was built)"
                )
            arrays[file] = np.asarray(array)  # a plain view of the map: cheaper indexing
        return arrays

    # -- reading --------------------------------------------------------------------------------
    def _read(self, spec: dict, rows: np.ndarray) -> Tensor:
        if spec["storage"] == "dense":
            return _from_storage(self._arrays[spec["files"][0]][rows], self.dtype)
        values, indices, fill = (self._arrays[file][rows] for file in spec["files"])
        return rebuild_topk_logits(
            _from_storage(values, self.dtype),
            torch.from_numpy(np.ascontiguousarray(indices)),
            _from_storage(fill, self.dtype),
            spec["shape"][0],
        )

    def lookup(
        self, index: Tensor, inputs: Tensor | None = None
    ) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """(output, {layer: features}) of the samples at dataset positions `index`, as float32.

        `inputs`: the batch's input samples (N×…, in `index` order). They are required: each
        must have the signature stored for its index, else CacheError says how many differ and
        why (see `kdistill.distill.teacher.store`); IndexError for an index outside [0, size).
        """
        rows, view = self._rows(index)
        self.signatures.check(rows, inputs, view)
        return self._read_rows(rows)

    def _read_rows(self, rows: np.ndarray) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """The stored rows, unchecked (`lookup` checks the inputs first)."""
        outputs: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        for spec in self.manifest["entries"].values():
            value = self._read(spec, rows)
            if spec["kind"] == "feature":
                features[spec["key"]] = value
            else:
                outputs[spec["key"]] = value
        if self.manifest["output_kind"] == "tensor":
            return outputs[None] if None in outputs else outputs[next(iter(outputs))], features
        return outputs, features

    def outputs(self) -> Tensor | dict[str, Tensor]:
        """Every sample's output, in dataset order (for a view cache: E·N rows, epoch by epoch);
        to inspect them — training reads them through `lookup`, which checks the inputs."""
        return self._read_rows(np.arange(self.size * (self.epochs or 1)))[0]

    def describe(self) -> str:
        """A few lines for people: what is stored, how big, and the storage error."""
        lines = [
            f"teacher cache {self.directory}: {self.size} samples of "
            f"{self.manifest['dataset']['name']!r}, teacher {self.manifest['teacher']['class']} "
            f"({_short(self.manifest['teacher']['sha256'])}), {self.dtype}"
            + (f", top-{self.topk}" if self.topk else "")
            + f", {self.nbytes() / 2**20:.1f} MiB, built in {self.manifest['build_seconds']} s",
        ]
        if self.views is not None:
            lines.append(
                f"  views of {self.epochs} epoch(s): {self.views['augmentation']}, augment seed "
                f"{self.views['seed']}"
            )
        for name, spec in self.manifest["entries"].items():
            err = self.errors.get(name, {})
            rows = self.size * (self.epochs or 1)
            shape = "×".join(str(s) for s in [rows, *spec["shape"]])
            text = f"  {name}: {shape} {spec['storage']}"
            text += f", max |error| {err.get('max_abs_error', 0):.3g}"
            if "mean_kl_T1" in err:
                text += (
                    f", mean KL(full ‖ stored) {err['mean_kl_T1']:.3g} at T=1, "
                    f"{err['mean_kl_T4']:.3g} at T=4"
                )
            lines.append(text)
        return "\n".join(lines)
