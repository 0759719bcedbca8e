"""Ready-made teachers and students, reachable by name.

Models are plain `nn.Module`s taking `in_channels` and `num_classes` (and `image_size` where
the architecture needs it). Causal language models (`kdistill.models.lm`: `gpt2_lm`,
`llama_lm`, `lm_teacher`, `lm_student`) take `vocab_size` and return Hugging Face
`CausalLMOutput`s. Classifiers return `N×num_classes` logits; the dense models of
`kdistill.models.dense` return segmentation maps (`seg_*`), YOLO-style grids (`det_*`) or a
dict of both (`multitask_*`)::

    from kdistill.models import create_model, count_parameters

    teacher = create_model("resnet20", in_channels=1, num_classes=10)
    student = create_model("middle_student", channels=(8, 16))
    count_parameters(student)

`list_models()` names them all; an unknown name raises KeyError with close names suggested.

Models from anywhere else (your own classes by import path, `torchvision:`, `timm:`, Hugging
Face `hf:`) are built from a *spec* by `model_from_spec` (`kdistill.models.specs`)::

    model_from_spec("mypkg.models:MyStudent", {"width": 16})
"""

from __future__ import annotations

from torch import nn

from kdistill.models.classic import ClassicTeacher, MiddleStudent, MiniStudent
from kdistill.models.dense import (
    DEFAULT_ANCHORS,
    Detector,
    MultiTaskNet,
    SegNet,
    decode,
    det_student,
    det_teacher,
    encode_targets,
    multitask_student,
    multitask_teacher,
    nms,
    seg_student,
    seg_teacher,
)
from kdistill.models.lm import (
    check_vocabulary,
    gpt2_lm,
    llama_lm,
    lm_student,
    lm_teacher,
)
from kdistill.models.resnet import (
    BasicBlock,
    ResNet,
    blocks_per_stage,
    resnet8,
    resnet14,
    resnet20,
    resnet32,
)
from kdistill.models.specs import ModelSpecError, check_model_spec, model_from_spec
from kdistill.registry import Registry

__all__ = [
    "DEFAULT_ANCHORS",
    "MODELS",
    "BasicBlock",
    "ClassicTeacher",
    "Detector",
    "MiddleStudent",
    "MiniStudent",
    "ModelSpecError",
    "MultiTaskNet",
    "ResNet",
    "SegNet",
    "blocks_per_stage",
    "check_model_spec",
    "check_vocabulary",
    "count_parameters",
    "create_model",
    "decode",
    "det_student",
    "det_teacher",
    "encode_targets",
    "gpt2_lm",
    "llama_lm",
    "lm_student",
    "lm_teacher",
    "list_models",
    "model_from_spec",
    "multitask_student",
    "multitask_teacher",
    "nms",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "seg_student",
    "seg_teacher",
]

MODELS: Registry[nn.Module] = Registry("model")
MODELS.register("classic_teacher")(ClassicTeacher)
MODELS.register("mini_student")(MiniStudent)
MODELS.register("middle_student")(MiddleStudent)
MODELS.register("resnet8")(resnet8)
MODELS.register("resnet14")(resnet14)
MODELS.register("resnet20")(resnet20)
MODELS.register("resnet32")(resnet32)
MODELS.register("seg_teacher")(seg_teacher)
MODELS.register("seg_student")(seg_student)
MODELS.register("det_teacher")(det_teacher)
MODELS.register("det_student")(det_student)
MODELS.register("multitask_teacher")(multitask_teacher)
MODELS.register("multitask_student")(multitask_student)
MODELS.register("gpt2_lm")(gpt2_lm)
MODELS.register("llama_lm")(llama_lm)
MODELS.register("lm_teacher")(lm_teacher)
MODELS.register("lm_student")(lm_student)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with constructor keyword arguments `kwargs`."""
    return MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared tensors counted once); buffers are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
