"""Relation distillation: losses on how the samples of a batch relate to one another.

Each loss builds a structure inside the batch (similarities, distances, angles, kernels, contrasts
with a memory bank) on each side and compares the two, so student and teacher may differ in
feature size; only the batch size must agree. Inputs are ``N×D`` embeddings or ``N×C×H×W`` maps,
flattened per sample. No connector is used.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill._checks import check_non_negative, check_positive
from kdistill.losses.base import INDEX, STUDENT, TEACHER, DistillLoss, register_loss
from kdistill.losses.feature import check_same_batch


def flat_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both sides as ``N×D`` (flattened per sample), after checking the batch sizes agree."""
    for x, name in ((student, "student features"), (teacher, "teacher features")):
        if x.dim() < 2:
            raise ValueError(
                f"{name} must be N×D or N×C×H×W (at least 2-dimensional), got shape "
                f"{tuple(x.shape)}"
            )
    check_same_batch(student, teacher, "student features", "teacher features")
    return student.flatten(1), teacher.flatten(1)


def cosine_matrix(features: Tensor) -> Tensor:
    """``N×N`` cosine similarities of the rows (a zero row has cosine 0 with every row)."""
    unit = F.normalize(features, dim=1)
    return unit @ unit.T


@register_loss("sp")
class SP(DistillLoss):
    """Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV).

    With F the ``N×D`` features (flattened per sample), ``G = rownormalize(F Fᵀ)`` (each row of
    the ``N×N`` Gram matrix divided by its L2 norm); loss ``‖G_s − G_t‖²_F / N²``.
    Unchanged when either side's features are scaled by a constant.
    """

    needs = (STUDENT, TEACHER)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        f_student, f_teacher = flat_pair(student_features, teacher_features)
        n = f_student.shape[0]
        g_student = F.normalize(f_student @ f_student.T, dim=1)
        g_teacher = F.normalize(f_teacher @ f_teacher.T, dim=1)
        return (g_student - g_teacher).pow(2).sum() / (n * n)


def pairwise_differences(embeddings: Tensor) -> Tensor:
    """``N×N×D``: entry [i, j] is ``e_i − e_j``."""
    return embeddings.unsqueeze(1) - embeddings.unsqueeze(0)


@register_loss("rkd")
class RKD(DistillLoss):
    """Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation" (CVPR).

    On embeddings e (``N×D``, flattened per sample), with ℓ the smooth-L1 loss (β = 1):

    - distance term: ``ψ_D(i, j) = ‖e_i − e_j‖ / μ``, μ the mean of the non-zero distances
      (i ≠ j); ``L_D = mean over the N² pairs of ℓ(ψ_D^s − ψ_D^t)`` (the zero diagonal included);
    - angle term: ``ψ_A(i, j, k) = ⟨ê_ij, ê_kj⟩``, ê_ij = (e_i − e_j)/‖e_i − e_j‖ (a zero
      difference gives the zero vector, so triplets with i = j or k = j have ψ_A = 0 on both
      sides); ``L_A = mean over all N³ ordered triplets of ℓ(ψ_A^s − ψ_A^t)``;

    loss ``distance_weight · L_D + angle_weight · L_A``. Both terms are unchanged when a side is
    scaled by a constant or translated. Memory grows as N²·D (the difference vectors) and N³.
    """

    needs = (STUDENT, TEACHER)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        check_non_negative(distance_weight, "distance_weight")
        check_non_negative(angle_weight, "angle_weight")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    @staticmethod
    def normalised_distances(differences: Tensor) -> Tensor:
        """``N×N`` distances divided by the mean of the non-zero ones (all zero stays zero)."""
        distances = differences.norm(dim=2)
        count = (distances > 0).sum().clamp(min=1)
        mean = distances.sum() / count
        return distances / mean.clamp(min=torch.finfo(distances.dtype).tiny)

    @staticmethod
    def angles(differences: Tensor) -> Tensor:
        """``N×N×N``: entry [j, i, k] is ``⟨ê_ij, ê_kj⟩``, the cosine of the angle at e_j."""
        unit = F.normalize(differences, dim=2)  # unit[i, j] = ê_ij
        at_vertex = unit.transpose(0, 1)  # at_vertex[j, i] = ê_ij
        return at_vertex @ at_vertex.transpose(1, 2)

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        e_student, e_teacher = flat_pair(student_embeddings, teacher_embeddings)
        d_student, d_teacher = pairwise_differences(e_student), pairwise_differences(e_teacher)
        loss = e_student.new_zeros(())
        if self.distance_weight > 0:
            distance = F.smooth_l1_loss(
                self.normalised_distances(d_student), self.normalised_distances(d_teacher)
            )
            loss = loss + self.distance_weight * distance
        if self.angle_weight > 0:
            angle = F.smooth_l1_loss(self.angles(d_student), self.angles(d_teacher))
            loss = loss + self.angle_weight * angle
        return loss

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


@register_loss("pkt")
class PKT(DistillLoss):
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer" (ECCV).

    With f flattened per sample and L2-normalised, ``k(i, j) = (1 + cos(f_i, f_j)) / 2`` maps the
    cosine similarities to [0, 1]; ``q(i, j) = k(i, j) / Σ_j' k(i, j')`` (rows sum to 1). Loss
    ``mean over the N² entries of q_t · log((q_t + ε) / (q_s + ε))``, ε = 1e-7.
    """

    needs = (STUDENT, TEACHER)
    eps = 1e-7

    @staticmethod
    def conditional_probabilities(features: Tensor) -> Tensor:
        similarity = (cosine_matrix(features) + 1) / 2
        return similarity / similarity.sum(dim=1, keepdim=True)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        f_student, f_teacher = flat_pair(student_features, teacher_features)
        q_student = self.conditional_probabilities(f_student)
        q_teacher = self.conditional_probabilities(f_teacher)
        eps = self.eps
        return (q_teacher * torch.log((q_teacher + eps) / (q_student + eps))).mean()


@register_loss("cc")
class CC(DistillLoss):
    """Peng et al. 2019, "Correlation Congruence for Knowledge Distillation" (ICCV).

    With ê_i the L2-normalised embedding of sample i (flattened) and ``c_ij = ⟨ê_i, ê_j⟩``, the
    sample-to-sample correlation is the order-P Taylor expansion of the Gaussian RBF kernel
    ``exp(−γ‖ê_i − ê_j‖²) = exp(−2γ) · exp(2γ c_ij)``:

        ``K_ij = exp(−2γ) · Σ_{p=0..P} (2γ)^p / p! · c_ij^p``

    (γ = `gamma`, P = `order`); loss ``‖K_s − K_t‖²_F / N²`` (sum of squares over the N×N entries
    divided by N²). Unchanged when either side is scaled by a positive constant.
    """

    needs = (STUDENT, TEACHER)

    def __init__(self, gamma: float = 0.4, order: int = 2):
        super().__init__()
        check_positive(gamma, "gamma")
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        self.gamma, self.order = float(gamma), order

    def kernel(self, features: Tensor) -> Tensor:
        correlation = cosine_matrix(features)
        two_gamma = 2 * self.gamma
        total = torch.ones_like(correlation)  # the p = 0 term
        power = torch.ones_like(correlation)
        for p in range(1, self.order + 1):
            power = power * correlation
            total = total + (two_gamma**p / math.factorial(p)) * power
        return math.exp(-two_gamma) * total

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        e_student, e_teacher = flat_pair(student_embeddings, teacher_embeddings)
        n = e_student.shape[0]
        return (self.kernel(e_student) - self.kernel(e_teacher)).pow(2).sum() / (n * n)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"


@register_loss("crd")
class CRD(DistillLoss):
    """Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation" (ICLR).

    Embedding heads (trained with the student): ``v_s = l2normalize(W_s f_s + b_s)``,
    ``v_t = l2normalize(W_t f_t + b_t)``, f flattened per sample, both of size `feature_dim`.
    Memory banks B_s, B_t (``num_samples × feature_dim`` buffers, unit rows) hold each dataset
    sample's past embeddings. For sample n with dataset index y_n, the candidates are
    ``j_{n,0} = y_n`` (the positive) and K = `num_negatives` indices drawn uniformly with
    replacement from [0, M), M = `num_samples`: ``torch.randint(0, M, (N, K))`` from the global
    generator, whose row r goes to the sample with the r-th smallest dataset index (a stable
    sort: equal indices keep their batch order) — an order that does not depend on how a batch
    is split among processes.
    The student side scores ``l_{n,k} = ⟨v_s[n], B_t[j_{n,k}]⟩ / τ − log Z_s`` (τ is
    `nce_temperature`, named apart from KD's T so that a temperature grid never touches it) and,
    with
    ``c = K / M`` (the noise probability of the negatives) and h = sigmoid(l − log c) =
    ``exp(l) / (exp(l) + c)``:

        ``L_s = mean_n [ −log h_{n,0} − Σ_{k=1..K} log(1 − h_{n,k}) ]``
              ``= mean_n [ softplus(log c − l_{n,0}) + Σ_{k≥1} softplus(l_{n,k} − log c) ]``

    the NCE objective of the paper. The teacher side L_t is the same with v_t against B_s and its
    own Z_t; the loss is ``L_s + L_t``. ``Z = M · mean(exp(score/τ))`` over the first call's
    ``N × (K+1)`` scores, then fixed (the normalisation constant of the authors' code); it is a
    buffer, like the banks, so checkpoints keep it. After computing the loss, in training mode
    only: ``B_s[y] ← l2normalize(m · B_s[y] + (1 − m) · v_s)`` and likewise B_t (no gradient),
    m = `momentum`; a bank row is written only at the batch's indices (an index that appears twice
    in a batch is written once, from its first occurrence).

    Under DDP (an initialised process group of several ranks, training mode), every rank gathers
    every rank's dataset indices and (detached) embeddings: the N above is the global batch (all
    ranks' samples), each rank draws the global batch's N × K negatives and keeps the rows of its
    own samples, Z is estimated from all ranks' scores, and every rank applies every rank's bank
    updates, so the banks stay identical on all ranks and equal to one process's with the same
    global batch (the engine then leaves them out of DDP's per-step buffer broadcast:
    ``syncs_buffers_across_ranks``). Each rank's loss is the mean over its own samples; DDP's
    gradient average makes it the global mean. This needs the same global RNG state on every
    rank (the same seed); with different states each rank's negatives are still uniform draws.
    In eval mode nothing is gathered (no collective, so one rank may evaluate alone).

    The heads are built in the constructor when `student_dim` and `teacher_dim` are given, else by
    `build` from the first batch's shapes; they must exist before the optimiser is made.
    """

    needs = (STUDENT, TEACHER, INDEX)
    syncs_buffers_across_ranks = True  # see the DDP paragraph above

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        feature_dim: int = 128,
        *,
        num_samples: int,
        num_negatives: int = 4096,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        for value, name in (
            (feature_dim, "feature_dim"),
            (num_samples, "num_samples"),
            (num_negatives, "num_negatives"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_positive(nce_temperature, "nce_temperature")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.feature_dim, self.num_samples, self.num_negatives = (
            feature_dim,
            num_samples,
            num_negatives,
        )
        self.nce_temperature, self.momentum = float(nce_temperature), float(momentum)
        self.student_head: nn.Linear | None = None
        self.teacher_head: nn.Linear | None = None
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError(
                "give both student_dim and teacher_dim, or neither (the heads are then built "
                f"from the first batch), got {student_dim!r} and {teacher_dim!r}"
            )
        if student_dim is not None and teacher_dim is not None:
            self.student_head = nn.Linear(student_dim, feature_dim)
            self.teacher_head = nn.Linear(teacher_dim, feature_dim)
        self.register_buffer("memory_student", self._random_bank())
        self.register_buffer("memory_teacher", self._random_bank())
        # log Z of the student and teacher sides; NaN until the first call sets them
        self.register_buffer("log_z", torch.full((2,), float("nan")))

    def _random_bank(self) -> Tensor:
        return F.normalize(torch.randn(self.num_samples, self.feature_dim), dim=1)

    def build(self, student_features: Tensor, teacher_features: Tensor) -> None:
        """Create the embedding heads from the flattened feature sizes (once; later calls check)."""
        dims = (student_features[0].numel(), teacher_features[0].numel())
        if self.student_head is None or self.teacher_head is None:
            device, dtype = student_features.device, student_features.dtype
            self.student_head = nn.Linear(dims[0], self.feature_dim, device=device, dtype=dtype)
            self.teacher_head = nn.Linear(dims[1], self.feature_dim, device=device, dtype=dtype)
            return
        expected = (self.student_head.in_features, self.teacher_head.in_features)
        if dims != expected:
            raise ValueError(
                f"CRD heads take {expected[0]} student and {expected[1]} teacher features per "
                f"sample, got {dims[0]} and {dims[1]} (shapes {tuple(student_features.shape)} "
                f"and {tuple(teacher_features.shape)})"
            )

    def _check_index(self, index: Tensor, batch: int) -> None:
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"index must hold integer dataset positions, got dtype {index.dtype}")
        if index.shape != (batch,):
            raise ValueError(
                f"index must have shape ({batch},), one dataset position per sample, "
                f"got {tuple(index.shape)}"
            )
        if batch and (index.min() < 0 or index.max() >= self.num_samples):
            raise ValueError(
                f"index must lie in [0, {self.num_samples - 1}] (num_samples = "
                f"{self.num_samples}), got min {int(index.min())} and max {int(index.max())}"
            )

    def _scores(self, embedding: Tensor, bank: Tensor, candidates: Tensor) -> Tensor:
        """``N×(K+1)`` scores ``⟨embedding[n], bank[candidates[n, k]]⟩ / τ``."""
        rows = bank[candidates].to(embedding.dtype)  # N×(K+1)×D
        return torch.einsum("nd,nkd->nk", embedding, rows) / self.nce_temperature

    def _side_loss(self, scores: Tensor, log_z: Tensor) -> Tensor:
        """The NCE loss of one side from its ``N×(K+1)`` scores (the positive first)."""
        logits = scores - log_z.to(scores.dtype)
        log_c = math.log(self.num_negatives / self.num_samples)
        positive = F.softplus(log_c - logits[:, 0])
        negatives = F.softplus(logits[:, 1:] - log_c).sum(dim=1)
        return (positive + negatives).mean()

    def _set_log_z(self, scores: tuple[Tensor, Tensor], gathered: bool) -> None:
        """Z = M · mean(exp(score)) of each side over the batch's scores (all ranks' when
        `gathered`), fixed from now on."""
        log_sums = torch.stack([torch.logsumexp(s.detach().flatten().double(), 0) for s in scores])
        count = torch.tensor([float(scores[0].numel())], dtype=torch.float64)
        if gathered:
            from kdistill.ops.collectives import all_gather

            parts = all_gather(torch.cat([log_sums.cpu(), count]))
            log_sums = torch.logsumexp(torch.stack([p[:2] for p in parts]), dim=0)
            count = sum(p[2:] for p in parts)
        log_mean = log_sums.cpu() - torch.log(count)
        self.log_z.copy_((math.log(self.num_samples) + log_mean).to(self.log_z.dtype))

    @staticmethod
    def _sorted_positions(index: Tensor) -> Tensor:
        """Position of each sample when the batch is stably sorted by dataset index."""
        order = torch.sort(index, stable=True).indices
        positions = torch.empty_like(order)
        positions[order] = torch.arange(len(order), device=order.device)
        return positions

    @torch.no_grad()
    def _update(self, bank: Tensor, index: Tensor, embedding: Tensor) -> None:
        """Write `embedding` rows into `bank` at `index`, an index seen twice from its first
        occurrence (deterministic, so every rank writes the same values)."""
        unique, inverse = torch.unique(index, return_inverse=True)
        first = torch.full_like(unique, len(index))
        first.scatter_reduce_(0, inverse, torch.arange(len(index), device=index.device), "amin")
        m = self.momentum
        rows = bank[unique] * m + embedding[first].detach().to(bank.dtype) * (1 - m)
        bank.index_copy_(0, unique, F.normalize(rows, dim=1))

    def _gather(self, index: Tensor, v_student: Tensor, v_teacher: Tensor):
        """All ranks' (index, v_student, v_teacher) in rank order, and where this rank's rows
        start; this rank's own tensors (offset 0) outside DDP training."""
        from kdistill.ops.collectives import all_gather_rows, info, is_distributed

        if not (self.training and is_distributed()):
            return index, v_student.detach(), v_teacher.detach(), 0, False
        d = v_student.shape[1]
        # one collective: indices (exact in float64 below 2**53) and float32/64 embeddings
        packed = torch.cat(
            [index.unsqueeze(1).double(), v_student.detach().double(), v_teacher.detach().double()],
            dim=1,
        )
        rows, counts = all_gather_rows(packed)
        offset = sum(counts[: info().rank])
        return (
            rows[:, 0].long(),
            rows[:, 1 : 1 + d].to(v_student.dtype),
            rows[:, 1 + d :].to(v_teacher.dtype),
            offset,
            True,
        )

    def forward(self, student_features: Tensor, teacher_features: Tensor, index: Tensor) -> Tensor:
        f_student, f_teacher = flat_pair(student_features, teacher_features)
        batch = f_student.shape[0]
        self._check_index(index, batch)
        if self.student_head is None or self.teacher_head is None:
            warnings.warn(
                "CRD built its embedding heads on its first call; an optimiser made before this "
                "call does not train them. Give student_dim and teacher_dim, or call "
                "CRD.build(student_features, teacher_features) before making the optimiser.",
                stacklevel=2,
            )
        self.build(f_student, f_teacher)
        assert self.student_head is not None and self.teacher_head is not None
        v_student = F.normalize(self.student_head(f_student), dim=1)
        v_teacher = F.normalize(self.teacher_head(f_teacher), dim=1)
        index = index.to(device=self.memory_student.device, dtype=torch.int64)
        return self._nce_and_update(index, v_student, v_teacher)

    def _nce_and_update(self, index: Tensor, v_student: Tensor, v_teacher: Tensor) -> Tensor:
        """The loss of the embeddings `v_*` (N×D) at dataset positions `index`, and the bank
        updates (in training mode); under DDP training, with every rank's samples."""
        batch = len(index)
        all_index, all_student, all_teacher, offset, gathered = self._gather(
            index, v_student, v_teacher
        )
        all_index = all_index.to(index.device)
        negatives = torch.randint(
            0, self.num_samples, (len(all_index), self.num_negatives), device=index.device
        )
        own = self._sorted_positions(all_index)[offset : offset + batch]
        candidates = torch.cat([index.unsqueeze(1), negatives[own]], dim=1)
        scores = (
            self._scores(v_student, self.memory_teacher, candidates),
            self._scores(v_teacher, self.memory_student, candidates),
        )
        if bool(torch.isnan(self.log_z).any()):
            self._set_log_z(scores, gathered)
        loss = self._side_loss(scores[0], self.log_z[0]) + self._side_loss(scores[1], self.log_z[1])
        if self.training:
            self._update(self.memory_student, all_index, all_student.to(v_student.device))
            self._update(self.memory_teacher, all_index, all_teacher.to(v_teacher.device))
        return loss

    def skip_step(self) -> None:
        """Take part in this step's collectives with no sample of its own: under DDP training,
        when an earlier term raised on this rank (a NaN: the engine then skips or stops the step
        on every rank) and this loss did not run, while it runs on the other ranks. Without it
        they would wait in the gather forever; with it every rank draws the same negatives and
        writes the other ranks' embeddings, so the banks stay identical on all ranks. A no-op
        outside DDP training (`wrap_ddp` calls it)."""
        from kdistill.ops.collectives import is_distributed

        if not (self.training and is_distributed()) or self.student_head is None:
            return
        weight = self.student_head.weight
        empty = weight.new_zeros((0, self.feature_dim))
        index = torch.zeros(0, dtype=torch.int64, device=self.memory_student.device)
        with torch.no_grad():
            self._nce_and_update(index, empty, empty)

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, num_samples={self.num_samples}, "
            f"num_negatives={self.num_negatives}, nce_temperature={self.nce_temperature}, "
            f"momentum={self.momentum}"
        )
