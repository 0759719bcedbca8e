"""Dense-prediction models for the Fashion-MNIST scenes: segmentation, detection, multi-task.

All three share one convolutional `Encoder` (a 3×3 stem at full resolution, then three stages
that each halve the resolution), so feature taps line up across them. Module names, as
`named_modules()` spells them:

- ``encoder.stem`` (1/1), ``encoder.stage1`` (1/2), ``encoder.stage2`` (1/4),
  ``encoder.stage3`` (1/8); each is a ``Sequential`` of conv-BN-ReLU blocks
  (``encoder.stage2.down`` is the stride-2 one, ``encoder.stage2.conv`` the next), each block
  with ``conv``, ``bn``, ``relu`` inside.
- `SegNet`: ``ppm`` (pyramid pooling on ``encoder.stage3``: ``ppm.branches.0…``, ``ppm.fuse``),
  ``decoder.up1`` (1/8 → 1/4, fused with ``encoder.stage2``), ``decoder.up2`` (→ 1/2, with
  ``encoder.stage1``), ``decoder.up3`` (→ 1/1, with ``encoder.stem``), ``head`` (1×1 conv to
  the class logits).
- `Detector`: ``neck`` (two 3×3 conv-BN-ReLU on ``encoder.stage3``), ``head`` (1×1 conv to
  ``A·(5+K)`` channels).
- `MultiTaskNet`: ``encoder``, then ``ppm``, ``decoder``, ``seg_head`` and ``det_neck``,
  ``det_head``.

Detection is YOLO-style at a single scale (Redmon & Farhadi 2017, "YOLO9000", anchors and the
sigmoid-offset / log-size box parametrisation): the 1/8 map is an ``S×S`` grid (S = 8 for 64×64
inputs) with ``A`` anchors per cell; the raw output is ``N×A×S×S×(5+K)`` laid out
``[tx, ty, tw, th, obj, cls_1 … cls_K]``, cell index order (row = y, column = x) as in a
``N×C×H×W`` map. A box decodes as ``cx = (i + σ(tx))·stride``, ``cy = (j + σ(ty))·stride``,
``w = a_w·exp(tw)``, ``h = a_h·exp(th)`` (pixels, x2/y2 exclusive like the scene boxes).
`decode` and `nms` go with it; the box coding (`encode_targets`, anchors) lives in
`kdistill.ops.boxes` and is re-exported here; the hard loss `YOLOLoss` ("yolo") is in
`kdistill.losses`.

Convs before BatchNorm have no bias; Kaiming-normal init (fan-out, ReLU gain). The detection
head's objectness bias starts at logit(0.01) so that early training is not swamped by the
negatives (Lin et al. 2017, "Focal Loss", §4.1 prior initialisation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill._checks import check_positive_int
from kdistill.ops.boxes import DEFAULT_ANCHORS, check_anchors, check_raw, encode_targets

__all__ = [
    "DEFAULT_ANCHORS",
    "Detector",
    "Encoder",
    "MultiTaskNet",
    "PyramidPooling",
    "SegNet",
    "decode",
    "det_student",
    "det_teacher",
    "encode_targets",
    "multitask_student",
    "multitask_teacher",
    "nms",
    "seg_student",
    "seg_teacher",
]

OBJECTNESS_PRIOR = 0.01

TEACHER_WIDTHS = (16, 32, 48, 96)
STUDENT_WIDTHS = (4, 8, 12, 24)

# Keep these opaque under torch.fx tracing (quantisation, feature extraction): they read shapes.
torch.fx.wrap("_resize_to")
torch.fx.wrap("_yolo_layout")
torch.fx.wrap("_check_input")


def _check_input(x: Tensor, in_channels: int, model: str) -> Tensor:
    """Return `x` unchanged if it is ``N×in_channels×H×W``, else raise."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{model} expects a batch of shape N×{in_channels}×H×W, got {tuple(x.shape)}; "
            "pass in_channels to the constructor to change it"
        )
    return x


def _resize_to(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinear resize of `x` to the spatial size of `reference` (``align_corners=False``)."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def _yolo_layout(x: Tensor, anchors: int, values: int) -> Tensor:
    """``N×(A·V)×S×S`` head output → ``N×A×S×S×V`` (channel ``a·V + v`` is anchor a, value v)."""
    n, _, rows, cols = x.shape
    return x.view(n, anchors, values, rows, cols).permute(0, 1, 3, 4, 2).contiguous()


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


def _check_widths(widths: Sequence[int], count: int, name: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in widths)
    if len(widths) != count or min(widths) < 1:
        raise ValueError(f"{name} must be {count} positive integers, got {widths!r}")
    return widths


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _detection_head(in_channels: int, anchors: int, num_classes: int) -> nn.Conv2d:
    """1×1 conv to ``A·(5+K)`` channels; small weights, objectness bias at logit(prior)."""
    values = 5 + num_classes
    head = nn.Conv2d(in_channels, anchors * values, 1)
    nn.init.normal_(head.weight, std=0.01)
    with torch.no_grad():
        head.bias.zero_()
        head.bias.view(anchors, values)[:, 4] = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR))
    return head


class Encoder(nn.Module):
    """``stem`` (3×3 conv-BN-ReLU, in → w0) then ``stage1…stage3``, each a stride-2 3×3
    conv-BN-ReLU (``down``) and a 3×3 conv-BN-ReLU (``conv``): widths w1, w2, w3 at 1/2, 1/4 and
    1/8 of the input. `forward` returns the four maps ``[stem, stage1, stage2, stage3]``."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        w0, w1, w2, w3 = _check_widths(widths, 4, "widths")
        self.widths = (w0, w1, w2, w3)
        self.stem = _conv_bn_relu(in_channels, w0)
        self.stage1 = self._stage(w0, w1)
        self.stage2 = self._stage(w1, w2)
        self.stage3 = self._stage(w2, w3)

    @staticmethod
    def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            OrderedDict(
                down=_conv_bn_relu(in_channels, out_channels, stride=2),
                conv=_conv_bn_relu(out_channels, out_channels),
            )
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = self.stem(x)
        stage1 = self.stage1(stem)
        stage2 = self.stage2(stage1)
        stage3 = self.stage3(stage2)
        return [stem, stage1, stage2, stage3]


class PyramidPooling(nn.Module):
    """The pyramid pooling module of PSPNet (Zhao et al. 2017, "Pyramid Scene Parsing Network").

    For each bin b: adaptive average pool to b×b → 1×1 conv (in → branch, with bias) → ReLU →
    bilinear upsample back; the input and all branches are concatenated and fused by a 3×3
    conv-BN-ReLU (→ out). The branches have no BatchNorm, so a 1×1 bin works at batch size 1.
    A bin larger than the map just repeats pixels (harmless; 8 fits a 64×64 input's 8×8 map).
    """

    def __init__(
        self, in_channels: int, branch_channels: int, out_channels: int, bins: Sequence[int]
    ):
        super().__init__()
        bins = tuple(int(b) for b in bins)
        if not bins or min(bins) < 1:
            raise ValueError(f"bins must be positive integers, got {bins!r}")
        self.bins = bins
        self.branches = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    pool=nn.AdaptiveAvgPool2d(b),
                    conv=nn.Conv2d(in_channels, branch_channels, 1),
                    relu=nn.ReLU(),
                )
            )
            for b in bins
        )
        self.fuse = _conv_bn_relu(in_channels + len(bins) * branch_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        pyramid = [x] + [_resize_to(branch(x), x) for branch in self.branches]
        return self.fuse(torch.cat(pyramid, dim=1))


def _fuse_coarse(logits: Tensor, coarse_head: nn.Module | None, context: Tensor) -> Tensor:
    """`logits` plus, with a `coarse_head`, its class scores on the 1/8 context map upsampled
    bilinearly: the score fusion of FCN's skip architecture (Long, Shelhamer & Darrell 2015,
    "Fully Convolutional Networks for Semantic Segmentation")."""
    if coarse_head is None:
        return logits
    return logits + _resize_to(coarse_head(context), logits)


class _Decoder(nn.Module):
    """Three upsampling steps back to the input size, each fused with an encoder skip:
    ``up1`` (1/8 → 1/4, + stage2), ``up2`` (→ 1/2, + stage1), ``up3`` (→ 1/1, + stem); each
    step is bilinear upsample → concat with the skip → 3×3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skips: Sequence[int], widths: Sequence[int]):
        super().__init__()
        d1, d2, d3 = _check_widths(widths, 3, "decoder_widths")
        s_stem, s1, s2 = skips
        self.up1 = _conv_bn_relu(in_channels + s2, d1)
        self.up2 = _conv_bn_relu(d1 + s1, d2)
        self.up3 = _conv_bn_relu(d2 + s_stem, d3)

    def forward(self, x: Tensor, features: list[Tensor]) -> Tensor:
        stem, stage1, stage2, _ = features
        x = self.up1(torch.cat([_resize_to(x, stage2), stage2], dim=1))
        x = self.up2(torch.cat([_resize_to(x, stage1), stage1], dim=1))
        return self.up3(torch.cat([_resize_to(x, stem), stem], dim=1))


class SegNet(nn.Module):
    """Encoder–decoder segmentation net with a PSPNet pyramid-pooling head (U-Net-style skips).

    ``encoder`` (widths w0…w3) → ``ppm`` on the 1/8 map (bins, ``ppm_channels`` per branch and
    out) → ``decoder`` (three steps back to full size, widths d1, d2, d3) → ``head`` (1×1 conv,
    d3 → num_classes). Output ``N×num_classes×H×W`` logits; ``num_classes`` counts background
    (11 for Fashion-MNIST scenes). Any input size works; multiples of 8 keep the maps aligned.

    ``coarse_head``: a second 1×1 conv (``head_coarse``, ppm_channels → num_classes) scores the
    classes on the 1/8 context map; its scores, upsampled bilinearly, are added to ``head``'s
    (FCN's score fusion, Long et al. 2015). Why the ¼-width student needs it: its last decoder
    layer has d3 = 4 channels, and every class score had to pass through them. Which of the 10
    items a foreground pixel belongs to is decided deep in the encoder; squeezed through 4
    full-resolution channels that also carry the object outlines, that evidence reached the
    logits so weakly that on 3 of 5 seeds the student settled into background plus one or two
    item classes (no channel was dead: the capacity was there, the path was not). With the
    coarse scores the 1/8 map's 24 channels reach the logits directly (`bench/seg_probe.py`).

    Built by `seg_teacher` (441,611 parameters, no coarse head) and `seg_student` (28,174
    parameters, coarse head), both at ``in_channels=1, num_classes=11``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 11,
        widths: Sequence[int] = TEACHER_WIDTHS,
        ppm_channels: int = 96,
        decoder_widths: Sequence[int] = (48, 32, 16),
        bins: Sequence[int] = (1, 2, 4, 8),
        coarse_head: bool = False,
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(ppm_channels, "ppm_channels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = Encoder(in_channels, widths)
        w0, w1, w2, w3 = self.encoder.widths
        self.ppm = PyramidPooling(w3, max(1, ppm_channels // 4), ppm_channels, bins)
        self.decoder = _Decoder(ppm_channels, (w0, w1, w2), decoder_widths)
        self.head = nn.Conv2d(self.decoder.up3.conv.out_channels, num_classes, 1)
        self.head_coarse = nn.Conv2d(ppm_channels, num_classes, 1) if coarse_head else None
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.in_channels, type(self).__name__)
        features = self.encoder(x)
        context = self.ppm(features[-1])
        logits = self.head(self.decoder(context, features))
        return _fuse_coarse(logits, self.head_coarse, context)


class Detector(nn.Module):
    """Single-scale YOLO-style detector: ``encoder`` → ``neck`` (two 3×3 conv-BN-ReLU on the
    1/8 map, w3 → neck_channels) → ``head`` (1×1 conv → A·(5+K)).

    Output ``N×A×S×S×(5+K)`` raw values ``[tx, ty, tw, th, obj, cls…]`` with S = H/8 (see the
    module docstring for their meaning). ``anchors`` (A×2 pixels) are kept as a non-persistent
    buffer, so `decode(out, model.anchors, image_size)` finds them on the output's device.

    Built by `det_teacher` (269,021 parameters) and `det_student` (17,609 parameters), both at
    ``in_channels=1, num_classes=10`` with the 3 default anchors.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        anchors: Sequence[Sequence[float]] | Tensor = DEFAULT_ANCHORS,
        widths: Sequence[int] = TEACHER_WIDTHS,
        neck_channels: int = 64,
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(neck_channels, "neck_channels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.register_buffer("anchors", check_anchors(anchors), persistent=False)
        self.num_anchors = len(self.anchors)
        self.encoder = Encoder(in_channels, widths)
        self.neck = nn.Sequential(
            OrderedDict(
                conv1=_conv_bn_relu(self.encoder.widths[3], neck_channels),
                conv2=_conv_bn_relu(neck_channels, neck_channels),
            )
        )
        _init_weights(self)
        self.head = _detection_head(neck_channels, self.num_anchors, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.in_channels, type(self).__name__)
        features = self.encoder(x)
        raw = self.head(self.neck(features[-1]))
        return _yolo_layout(raw, self.num_anchors, 5 + self.num_classes)


class MultiTaskNet(nn.Module):
    """A shared `Encoder` with a segmentation branch (``ppm`` → ``decoder`` → ``seg_head``, as
    in `SegNet`) and a detection branch (``det_neck`` → ``det_head`` on ``encoder.stage3``, as in
    `Detector`).

    `forward` returns ``{"seg": N×seg_classes×H×W, "det": N×A×S×S×(5+K)}``; ``num_classes`` is
    the object classes K, ``seg_classes`` defaults to K + 1 (background first).

    ``coarse_head``: as in `SegNet` (``seg_head_coarse`` on the context map), for the
    segmentation output.

    Built by `multitask_teacher` (536,952 parameters) and `multitask_student` (34,763
    parameters, coarse head) at ``in_channels=1, num_classes=10``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        seg_classes: int | None = None,
        anchors: Sequence[Sequence[float]] | Tensor = DEFAULT_ANCHORS,
        widths: Sequence[int] = TEACHER_WIDTHS,
        ppm_channels: int = 96,
        decoder_widths: Sequence[int] = (48, 32, 16),
        neck_channels: int = 64,
        bins: Sequence[int] = (1, 2, 4, 8),
        coarse_head: bool = False,
    ):
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        seg_classes = num_classes + 1 if seg_classes is None else seg_classes
        check_positive_int(seg_classes, "seg_classes")
        check_positive_int(ppm_channels, "ppm_channels")
        check_positive_int(neck_channels, "neck_channels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.seg_classes = seg_classes
        self.register_buffer("anchors", check_anchors(anchors), persistent=False)
        self.num_anchors = len(self.anchors)
        self.encoder = Encoder(in_channels, widths)
        w0, w1, w2, w3 = self.encoder.widths
        self.ppm = PyramidPooling(w3, max(1, ppm_channels // 4), ppm_channels, bins)
        self.decoder = _Decoder(ppm_channels, (w0, w1, w2), decoder_widths)
        self.seg_head = nn.Conv2d(self.decoder.up3.conv.out_channels, seg_classes, 1)
        self.seg_head_coarse = nn.Conv2d(ppm_channels, seg_classes, 1) if coarse_head else None
        self.det_neck = nn.Sequential(
            OrderedDict(
                conv1=_conv_bn_relu(w3, neck_channels),
                conv2=_conv_bn_relu(neck_channels, neck_channels),
            )
        )
        _init_weights(self)
        self.det_head = _detection_head(neck_channels, self.num_anchors, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = _check_input(x, self.in_channels, type(self).__name__)
        features = self.encoder(x)
        context = self.ppm(features[-1])
        seg = _fuse_coarse(
            self.seg_head(self.decoder(context, features)), self.seg_head_coarse, context
        )
        det = self.det_head(self.det_neck(features[-1]))
        return {"seg": seg, "det": _yolo_layout(det, self.num_anchors, 5 + self.num_classes)}


# --- the registered sizes ------------------------------------------------------------------


def seg_teacher(*, in_channels: int = 1, num_classes: int = 11, **kwargs) -> SegNet:
    """Wide `SegNet`: widths (16, 32, 48, 96), PPM 96, decoder (48, 32, 16); 441,611 params."""
    kwargs.setdefault("widths", TEACHER_WIDTHS)
    kwargs.setdefault("ppm_channels", 96)
    kwargs.setdefault("decoder_widths", (48, 32, 16))
    return SegNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def seg_student(*, in_channels: int = 1, num_classes: int = 11, **kwargs) -> SegNet:
    """Narrow `SegNet`: widths (4, 8, 12, 24), PPM 24, decoder (12, 8, 4), coarse head;
    28,174 params (27,899 with ``coarse_head=False``, the student of earlier releases)."""
    kwargs.setdefault("widths", STUDENT_WIDTHS)
    kwargs.setdefault("coarse_head", True)
    kwargs.setdefault("ppm_channels", 24)
    kwargs.setdefault("decoder_widths", (12, 8, 4))
    return SegNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def det_teacher(*, in_channels: int = 1, num_classes: int = 10, **kwargs) -> Detector:
    """Wide `Detector`: widths (16, 32, 48, 96), neck 64, 3 anchors; 269,021 params."""
    kwargs.setdefault("widths", TEACHER_WIDTHS)
    kwargs.setdefault("neck_channels", 64)
    return Detector(in_channels=in_channels, num_classes=num_classes, **kwargs)


def det_student(*, in_channels: int = 1, num_classes: int = 10, **kwargs) -> Detector:
    """Narrow `Detector`: widths (4, 8, 12, 24), neck 16, 3 anchors; 17,609 params."""
    kwargs.setdefault("widths", STUDENT_WIDTHS)
    kwargs.setdefault("neck_channels", 16)
    return Detector(in_channels=in_channels, num_classes=num_classes, **kwargs)


def multitask_teacher(*, in_channels: int = 1, num_classes: int = 10, **kwargs) -> MultiTaskNet:
    """Wide `MultiTaskNet` (the seg teacher's and det teacher's sizes); 536,952 params."""
    kwargs.setdefault("widths", TEACHER_WIDTHS)
    kwargs.setdefault("ppm_channels", 96)
    kwargs.setdefault("decoder_widths", (48, 32, 16))
    kwargs.setdefault("neck_channels", 64)
    return MultiTaskNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


def multitask_student(*, in_channels: int = 1, num_classes: int = 10, **kwargs) -> MultiTaskNet:
    """Narrow `MultiTaskNet` (the students' sizes), coarse head; 34,763 params (34,488 with
    ``coarse_head=False``, the student of earlier releases)."""
    kwargs.setdefault("widths", STUDENT_WIDTHS)
    kwargs.setdefault("coarse_head", True)
    kwargs.setdefault("ppm_channels", 24)
    kwargs.setdefault("decoder_widths", (12, 8, 4))
    kwargs.setdefault("neck_channels", 16)
    return MultiTaskNet(in_channels=in_channels, num_classes=num_classes, **kwargs)


# --- YOLO decoding ------------------------------------------------------------------------


def decode(
    raw: Tensor,
    anchors: Sequence[Sequence[float]] | Tensor,
    image_size: int | tuple[int, int],
    conf_threshold: float = 0.25,
    iou_threshold: float | None = None,
) -> list[Tensor]:
    """Raw ``N×A×S×S×(5+K)`` → one ``P×6`` tensor ``[x1, y1, x2, y2, score, class]`` per image.

    ``cx = (i + σ(tx))·stride_x``, ``cy = (j + σ(ty))·stride_y``, ``w = a_w·exp(tw)``,
    ``h = a_h·exp(th)`` (tw, th clamped to ±10 before exp); corners clipped to the image.
    score = ``σ(obj) · max_k softmax(cls)_k``, class = its arg-max; slots with score
    ``>= conf_threshold`` are kept, in descending score order. With ``iou_threshold`` the boxes
    then go through class-aware `nms`. This is the format `DetectionMAP.update` takes.
    """
    anchors_t = check_anchors(anchors).to(raw.device, raw.dtype)
    check_raw(raw, len(anchors_t))
    n, a, rows, cols, _ = raw.shape
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    stride_x, stride_y = width / cols, height / rows
    raw = raw.detach()
    j = torch.arange(rows, device=raw.device, dtype=raw.dtype).view(1, 1, rows, 1)
    i = torch.arange(cols, device=raw.device, dtype=raw.dtype).view(1, 1, 1, cols)
    cx = (i + raw[..., 0].sigmoid()) * stride_x
    cy = (j + raw[..., 1].sigmoid()) * stride_y
    w = anchors_t[:, 0].view(1, a, 1, 1) * raw[..., 2].clamp(-10, 10).exp()
    h = anchors_t[:, 1].view(1, a, 1, 1) * raw[..., 3].clamp(-10, 10).exp()
    probability, label = raw[..., 5:].softmax(dim=-1).max(dim=-1)
    score = raw[..., 4].sigmoid() * probability
    corners = torch.stack(
        [
            (cx - w / 2).clamp(0, width),
            (cy - h / 2).clamp(0, height),
            (cx + w / 2).clamp(0, width),
            (cy + h / 2).clamp(0, height),
        ],
        dim=-1,
    )
    detections = torch.cat([corners, score[..., None], label[..., None].to(raw.dtype)], dim=-1)
    result = []
    for image in detections.view(n, -1, 6):
        image = image[image[:, 4] >= conf_threshold]
        image = image[torch.sort(image[:, 4], descending=True, stable=True).indices]
        if iou_threshold is not None:
            image = image[nms(image[:, :4], image[:, 4], iou_threshold, image[:, 5])]
        result.append(image)
    return result


def _pairwise_iou(boxes: Tensor) -> Tensor:
    """P×P IoU of ``[x1, y1, x2, y2]`` boxes (area ``(x2 − x1)·(y2 − y1)``; 0 for empty unions)."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    sides = (bottom_right - top_left).clamp(min=0)
    inter = sides[..., 0] * sides[..., 1]
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, classes: Tensor | None = None
) -> Tensor:
    """Greedy non-maximum suppression; returns the kept indices (int64), best score first.

    Boxes ``P×4`` ``[x1, y1, x2, y2]`` are visited in descending score (stable: ties keep input
    order); a box is kept unless a kept box *of the same class* overlaps it with IoU
    ``> iou_threshold``. Without ``classes`` all boxes count as one class.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"nms needs boxes P×4 and scores P, got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if classes is not None and classes.shape != scores.shape:
        raise ValueError(f"classes must be P like scores, got shape {tuple(classes.shape)}")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlap = _pairwise_iou(boxes[order].float()) > iou_threshold
    if classes is not None:
        ranked = classes[order]
        overlap &= ranked[:, None] == ranked[None, :]
    overlap = overlap.cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        kept.append(rank)
        suppressed |= overlap[rank]
    return order[torch.tensor(kept, device=order.device)]
