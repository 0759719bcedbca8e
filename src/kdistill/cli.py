"""`kdistill …`: the command line. Each sub-command is a thin wrapper over the library."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from kdistill.errors import KdistillError

BUILTIN_RECIPES = Path(__file__).parent / "recipes" / "builtin"
DEFAULT_RECIPE = "fashion_mnist"


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a built-in recipe (`fashion_mnist`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = BUILTIN_RECIPES / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    known = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    raise KdistillError(
        f"{name_or_path}: no such recipe file or built-in recipe (built-in: {known})"
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument("--seeds", type=int, help="train every student with this many seeds")
    parser.add_argument(
        "--methods", help="comma-separated methods of the recipe to run (default: all)"
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in the same folder; finished models are kept",
    )
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="skip the validation grid; use the recipe's distillation settings",
    )
    parser.add_argument("--data-root", help="folder holding the dataset files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")


def run_command(args: argparse.Namespace, recipe_arg: str) -> int:
    from kdistill.recipes import Experiment, load_recipe
    from kdistill.report import write_report

    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.no_tune:
        overrides.append("tune.enabled=false")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    recipe = load_recipe(resolve_recipe(recipe_arg), overrides)
    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in recipe.distill.methods]
        if unknown:
            raise KdistillError(
                f"--methods: {unknown} are not methods of recipe {recipe.name!r} "
                f"(it has {sorted(recipe.distill.methods)})"
            )
    out_dir = args.out or Path("runs") / recipe.name
    experiment = Experiment(recipe, out_dir, resume=args.resume, progress=not args.quiet)
    summary = experiment.run(methods)
    command = "kdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = write_report(summary, recipe, command)
    print(table)
    print(
        f"\n{out_dir}: report.md, results.json, metrics.jsonl, curves.png "
        f"({summary.seconds / 60:.1f} min)"
    )
    return 0


def list_recipes(args: argparse.Namespace) -> int:
    for path in sorted(BUILTIN_RECIPES.glob("*.yaml")):
        print(f"{path.stem}\t{path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Each sub-command sets `handler`: parsed arguments in, exit code out."""
    parser = argparse.ArgumentParser(
        prog="kdistill", description="Knowledge distillation for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe: teacher, students alone, distilled")
    run.add_argument("recipe", help="a recipe YAML file or a built-in recipe name")
    add_run_options(run)
    run.set_defaults(handler=lambda args: run_command(args, args.recipe))

    demo = commands.add_parser("demo", help=f"run the default recipe ({DEFAULT_RECIPE})")
    add_run_options(demo)
    demo.set_defaults(handler=lambda args: run_command(args, DEFAULT_RECIPE))

    recipes = commands.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(handler=list_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        return args.handler(args)
    except KdistillError as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"kdistill: interrupted after {time.perf_counter() - started:.0f} s; "
            "run again with --resume to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
