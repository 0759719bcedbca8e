"""Data kinds: registered readers of the user's files (and the built-in sets), one per format
and target, each with a validator and a fingerprint (see `kdistill.data.kinds.base` and
docs/data-kinds.md).

| target (task)                  | kinds                                                   |
|--------------------------------|---------------------------------------------------------|
| class (classification)         | fashion_mnist, digits, imagefolder, npz, factory        |
| mask (segmentation)            | fashion_mnist_scenes, masks, npz, factory               |
| boxes (detection)              | fashion_mnist_scenes, coco, yolo, factory               |
| mask+boxes (multitask)         | fashion_mnist_scenes, coco, yolo (+ masks/), factory    |
| tokens (language_modeling)     | kjv, text, jsonl, factory                               |
| completions (completion)       | kjv_completions, jsonl, factory                         |
"""

from kdistill.data.kinds import classification as _classification  # noqa: F401  (registers)
from kdistill.data.kinds import detection as _detection  # noqa: F401
from kdistill.data.kinds import segmentation as _segmentation  # noqa: F401
from kdistill.data.kinds import text as _text  # noqa: F401
from kdistill.data.kinds.base import (
    COMMON_KEYS,
    TARGETS,
    TASK_OF_TARGET,
    DataKind,
    DataSplits,
    file_digest,
    get_kind,
    kinds_for,
    read_data,
    register_kind,
    resolve,
    spec_dict,
)
from kdistill.data.kinds.tokenizer import TextTokenizer, as_text_tokenizer

__all__ = [
    "COMMON_KEYS",
    "TARGETS",
    "TASK_OF_TARGET",
    "DataKind",
    "DataSplits",
    "TextTokenizer",
    "as_text_tokenizer",
    "file_digest",
    "get_kind",
    "kinds_for",
    "read_data",
    "register_kind",
    "resolve",
    "spec_dict",
]
