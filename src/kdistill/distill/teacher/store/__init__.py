"""The teacher-output cache: offline distillation from memory-mapped teacher outputs.

A teacher does not change while a student trains, so its outputs (and tapped features) can be
computed once per training sample and read back by sample index. `build_teacher_cache` writes a
folder::

    manifest.json            written last, atomically; "complete": true marks a finished build
    output.npy               N×… outputs (a dict output: output.<key>.npy per key)
    output.topk_values.npy   with top-k storage instead: N×k largest logits,
    output.topk_indices.npy  N×k their class indices,
    output.topk_fill.npy     N   one logit shared by the K − k other classes
    feature.<layer>.npy      N×… each tapped teacher layer
    inputs.signature.npy     N×2 float64: each input sample's signature (see below)

and `TeacherCache.open` checks it against the teacher and the data before anything is read:
the teacher weights digest (`tensors_digest` of its state dict, buffers included), the dataset
fingerprint (`ArrayDataset.fingerprint()`), the storage dtype, top-k and the layer list. A stale
or mismatched cache raises `CacheError` naming every difference; a build that did not finish
(its manifest still says ``"complete": false``), a missing or truncated array file, or (with
``verify=True``) an array whose bytes changed is refused too.

Every lookup is checked against the data it is used with: `lookup(index, inputs)` needs the
batch's inputs, and each sample's signature — its dot product, in float64, with a fixed
pseudo-random vector r (splitmix64, values in [-1, 1), the same on every machine and version) —
must equal the one stored at build time to within 1e-6 · Σ|x_i·r_i|. Float64 rounding of the
same D inputs, summed in any order, stays below D · 2^-53 of that (< 1e-10 for D ≤ 10^6); any
other sample, order, subset or normalisation differs by far more. A mismatch raises
`CacheError`: the stored outputs belong to other inputs — the cache was built on the full set
and used with a `split_train_val` part, on data in another order, on another dataset of the
same size, or with other transforms. In-memory teacher outputs (`MemoryTeacherOutputs`) carry
the same signatures and the same check, so no stored teacher output reaches training for a
sample it was not computed on. Cost: one float64 dot product per sample — 0.1–0.3 ms a batch
of 128 Fashion-MNIST images on 2 CPU threads, 1–2.5 % of a cached step (`bench/bench_speed.py`
prints it).

Storage dtypes: float32 (exact), float16 and bfloat16 (numpy has no bfloat16: its 16-bit
patterns are stored as int16). `lookup` always returns float32 tensors. The rounding error of
each array against the float32 teacher outputs is measured during the build and recorded in the
manifest (`errors`).

Top-k storage (outputs of ≥ 2 dims, classes on dim 1), for wide outputs: per sample the k
largest logits z_(1..k), their indices, and one fill value

    m = log( Σ_{j ∉ top-k} exp(z_j) / (K − k) )

given to every other class. The rebuilt logits are z_j on the top-k and m elsewhere, so at
T = 1 the rebuilt softmax is exact on each top-k class and the K − k others share the true
remaining probability mass equally (renormalised: it sums to 1). m ≤ max_{j ∉ top-k} z_j, so
the ranking of the top-k is kept. At T ≠ 1 the tail is an approximation: the build records
mean_n KL(softmax(z/T) ‖ softmax(ẑ/T)) at T = 1 and T = 4 (`errors.output.mean_kl_T1/T4`).

Augmentation. A plain cache records ``"transforms": "none"``: one output per sample. A dataset
or loader flagged as randomly augmented (a truthy ``augment`` attribute: views drawn from a
stateful generator) cannot be cached exactly — the teacher would see other pixels than the
student — so `build_teacher_cache` refuses it, and `offline_teacher_outputs` falls back to
online distillation with a warning.

Keyed augmentation is cached exactly. A `BatchLoader` with ``augmentation=`` makes each view a
fixed function of (augment seed, epoch, sample index) (`kdistill.data.augment`), so
`build_view_cache(teacher, loader, directory, epochs=E)` runs the teacher once over E epochs of
the loader's batches and stores row ``e·N + i`` = the teacher's output on sample i's view in
epoch e, with that view's signature; the manifest's ``views`` records E, the augmentation and
its seed. `fit` tells the cache which epoch runs (`set_epoch`), and each lookup checks the batch
against the signatures of *that epoch's views*: a loader on another epoch, augmentation or seed
fails the check like other data. Built from the very batches training uses (the same loader),
a float32 view cache replays the online teacher bit for bit; views of a sample do not depend on
the batch, so another shuffling still gets the right views (to the last bit of a CPU kernel's
batch-dependent rounding). `MemoryTeacherOutputs.predict(teacher, loader, epochs=E)` keeps the
same rows in memory.

Token sequences (language models): `kdistill.cache.tokens` stores each position's top-k
next-token distribution (`TopKDistribution`) instead of N×L×V logits — `build_token_cache`,
`TokenTeacherCache` — with the same teacher / data checks and the same `TeacherSource` lookup.

The modules: `manifest` (manifest, fingerprints, storage dtypes, the stand-in teacher),
`signatures` (which inputs stored outputs belong to), `images` / `image_build` (the image-output
store, read and build), `memory` (outputs in memory), `tokens` (top-k token distributions),
`offline` (whether stored outputs can serve a training). This package re-exports their public
names; it was `kdistill.cache` before issue 26 (that path still imports).
"""

from __future__ import annotations

from kdistill.distill.teacher.base import TeacherSource
from kdistill.distill.teacher.store.image_build import build_teacher_cache, build_view_cache
from kdistill.distill.teacher.store.images import (
    FORMAT_VERSION,
    TeacherCache,
    encode_topk,
    rebuild_topk_logits,
)
from kdistill.distill.teacher.store.manifest import (
    CACHE_DTYPES,
    MANIFEST,
    CachedTeacher,
    is_randomly_augmented,
    loader_views,
    teacher_digest,
)
from kdistill.distill.teacher.store.memory import MemoryTeacherOutputs
from kdistill.distill.teacher.store.offline import offline_teacher_outputs
from kdistill.distill.teacher.store.signatures import (
    _SPLITMIX_SEED,  # noqa: F401  (tests check the signature vector against it)
    SIGNATURE_FILE,
    SIGNATURE_METHOD,
    SIGNATURE_RTOL,
    InputSignatures,
    _as_rows,  # noqa: F401  (bench/bench_speed.py times it)
    _projection,  # noqa: F401
    input_signatures,
)
from kdistill.distill.teacher.store.tokens import TokenTeacherCache, build_token_cache

__all__ = [
    "CACHE_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST",
    "SIGNATURE_FILE",
    "SIGNATURE_METHOD",
    "SIGNATURE_RTOL",
    "CachedTeacher",
    "InputSignatures",
    "MemoryTeacherOutputs",
    "TeacherCache",
    "TeacherSource",
    "TokenTeacherCache",
    "build_teacher_cache",
    "build_token_cache",
    "build_view_cache",
    "encode_topk",
    "input_signatures",
    "is_randomly_augmented",
    "loader_views",
    "offline_teacher_outputs",
    "rebuild_topk_logits",
    "teacher_digest",
]
