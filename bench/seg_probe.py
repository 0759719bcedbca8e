"""Why do the ¼-width segmentation students collapse on some seeds? A probe on short runs.

    python bench/seg_probe.py --variants no_coarse_head --seeds 0,1,2,3,4 --epochs 3
    python bench/seg_probe.py --variants no_coarse_head,coarse_head --json runs/seg_probe.json
    python bench/seg_probe.py --plot docs/seg_probe.png --from runs/seg_probe.json

The data are `recipes/scenes_segmentation.yaml`'s (4 000 training scenes, 500 of them held out
for validation; `--train-count` for fewer). Each variant of the student is trained alone (CE,
the recipe's optimiser, lr and batch size, cosine over `--epochs`) from the seeds' initial
weights, and after every epoch reports the validation mIoU, the share of validation pixels
predicted as each class, and per channel of the encoder's last stage, the pyramid pooling and
each decoder step the share of positions where it is active (> 0): a channel active (almost)
nowhere is dead.
`--teacher` (a trained seg_teacher's safetensors) adds the recipe's PixelKD (α = 0.5, T = 1)
as a distilled objective.

A run counts as collapsed when its validation mIoU ends below 15 % (predicting background and
one or two item classes scores 10–12 %). Variants are model-kwarg overrides of `seg_student`
(`VARIANTS`): `no_coarse_head` is the student of earlier releases (named `registered` in the
first probe's output), `coarse_head` the registered one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kdistill import losses as L
from kdistill.data import BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.models import create_model
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import load_splits, recipe_task
from kdistill.tasks import evaluate

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "scenes_segmentation.yaml"

#: name → keyword arguments of seg_student (on top of its defaults)
VARIANTS: dict[str, dict] = {
    "no_coarse_head": {"coarse_head": False},  # the student of earlier releases
    "coarse_head": {"coarse_head": True},  # the registered student
    "wide_last": {"decoder_widths": (12, 8, 8), "coarse_head": False},
}


WATCHED = ("encoder.stage3", "ppm.fuse", "decoder.up1", "decoder.up2", "decoder.up3")


def collapse_stats(model, loader, num_classes: int) -> dict:
    """Share of validation pixels predicted per class; per channel of each `WATCHED` layer
    (each ends in a ReLU), the share of its output positions where it is > 0 (0: dead)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, out)
        )
        for name in WATCHED
    ]
    counts = torch.zeros(num_classes)
    active: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.inputs)
            counts += torch.bincount(logits.argmax(1).flatten(), minlength=num_classes)
            for name, out in seen.items():
                positive = (out > 0).float().sum(dim=(0, 2, 3))
                active[name] = active.get(name, 0) + positive
                positions[name] = positions.get(name, 0) + out[:, 0].numel()
    for hook in hooks:
        hook.remove()
    return {
        "predicted_share": (counts / counts.sum()).tolist(),
        "active": {name: (active[name] / positions[name]).tolist() for name in WATCHED},
    }


def plot(results: list[dict], path: Path) -> None:
    """Validation mIoU per epoch, one line per (variant, seed), a panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["variant"] for row in results))
    figure, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), sharey=True)
    for axis, variant in zip([axes] if len(variants) == 1 else axes, variants):
        for row in (r for r in results if r["variant"] == variant):
            epochs = range(1, len(row["val_miou"]) + 1)
            style = "--" if row["collapsed"] else "-"
            label = f"seed {row['seed']} {row['method']}" + (
                " (collapsed)" if row["collapsed"] else ""
            )
            axis.plot(epochs, [100 * m for m in row["val_miou"]], style, marker="o", label=label)
        axis.set_title(variant)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    (axes if len(variants) == 1 else axes[0]).set_ylabel("validation mIoU (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, help="only plot the --from JSON files to this PNG")
    parser.add_argument("--from", dest="sources", nargs="*", type=Path, default=[])
    parser.add_argument("--variants", default="no_coarse_head,coarse_head")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-count", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", help="trained seg_teacher weights: adds PixelKD runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.plot is not None:
        plot([row for source in args.sources for row in json.loads(source.read_text())], args.plot)
        return 0
    torch.set_num_threads(args.threads)
    recipe = load_recipe(
        RECIPE, [f"data.scenes.train_count={args.train_count}", "data.scenes.test_count=1"]
    )
    task = recipe_task(recipe)
    splits = load_splits(recipe, task)
    val = BatchLoader(splits.val, 100)
    classes = splits.train.num_seg_classes
    teacher = None
    if args.teacher:
        from kdistill.engine.checkpoint import load_state_dict_file

        teacher = create_model("seg_teacher").eval()
        teacher.load_state_dict(load_state_dict_file(args.teacher))
    config = recipe.train.model_copy(update={"epochs": args.epochs, "progress": False})
    results = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            objectives = {"alone": [Term(L.CE())]}
            if teacher is not None:
                objectives["pixel_kd"] = [
                    Term(L.CE(), weight=0.5),
                    Term(L.PixelKD(temperature=1.0), weight=0.5),
                ]
            for method, terms in objectives.items():
                torch.manual_seed(seed)
                student = create_model("seg_student", **VARIANTS[variant])
                curve: list[float] = []

                def record(model, curve=curve):
                    metrics = evaluate(model, val, task, "cpu")
                    curve.append(metrics["miou"])
                    return metrics

                started = time.perf_counter()
                fit(
                    Distiller(teacher if method != "alone" else None, student, terms),
                    BatchLoader(splits.train, config.batch_size, shuffle=True, seed=seed),
                    TrainConfig(**config.model_dump()),
                    evaluate=record,
                )
                row = {
                    "variant": variant,
                    "method": method,
                    "seed": seed,
                    "val_miou": curve,
                    "collapsed": curve[-1] < 0.15,
                    "seconds": round(time.perf_counter() - started, 1),
                    **collapse_stats(student, val, classes),
                }
                results.append(row)
                shares = " ".join(f"{100 * s:.0f}" for s in row["predicted_share"])
                dead = " ".join(
                    f"{name.split('.')[-1]} {sum(a < 0.01 for a in act)}/{len(act)}"
                    for name, act in row["active"].items()
                )
                print(
                    f"{variant:>18} {method:>8} seed {seed}: val mIoU "
                    + " → ".join(f"{100 * m:.1f}" for m in curve)
                    + f" | predicted % per class [{shares}] | dead channels: {dead}",
                    flush=True,
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
