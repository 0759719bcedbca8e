"""`kdistill …`: the command line. Each sub-command is a thin wrapper over the library."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from kdistill.allocator import retain_freed_memory
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
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow the teacher checkpoint and the students' whole_model files to be pickles "
        "(torch.save(model)); unpickling runs code from the file, so only for files you trust",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")


def run_command(args: argparse.Namespace, recipe_arg: str) -> int:
    from kdistill.engine.distributed import cleanup, init_distributed
    from kdistill.recipes import Experiment, load_recipe
    from kdistill.report import write_report

    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.no_tune:
        overrides.append("tune.enabled=false")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.trust_checkpoint:
        overrides.append("teacher.trust_checkpoint=true")
    recipe = load_recipe(resolve_recipe(recipe_arg), overrides)
    if args.trust_checkpoint:  # and every student's whole_model
        for student in recipe.students:
            student.trust_checkpoint = True
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
    world = init_distributed(recipe.train.device)  # under torchrun: join the process group
    try:
        experiment = Experiment(recipe, out_dir, resume=args.resume, progress=not args.quiet)
        summary = experiment.run(methods)
        if not world.is_main:  # rank 0 writes the report and prints
            return 0
        command = "kdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        table = write_report(summary, recipe, command)
        print(table)
        print(
            f"\n{out_dir}: report.md, results.json, metrics.jsonl, curves.png "
            f"({summary.seconds / 60:.1f} min)"
        )
        return 0
    finally:
        cleanup()


def compress_command(args: argparse.Namespace) -> int:
    """`kdistill compress <recipe>`: prune the teacher → distill → int8, costed at each stage."""
    from kdistill.compress.pipeline import run_compress
    from kdistill.compress.report import write_compress_report
    from kdistill.recipes import load_recipe

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    recipe = load_recipe(resolve_recipe(args.recipe), overrides)
    out_dir = args.out or Path("runs") / recipe.name
    summary = run_compress(recipe, out_dir, progress=not args.quiet)
    command = "kdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = write_compress_report(summary, recipe, command)
    print(table)
    print(
        f"\n{out_dir}: report.md, report.html, results.json, export/ "
        f"({summary.seconds / 60:.1f} min)"
    )
    return 0


def cache_command(args: argparse.Namespace) -> int:
    """`kdistill cache <recipe>`: the teacher's outputs over the training split, stored once."""
    from kdistill.cache import TeacherCache, build_teacher_cache
    from kdistill.errors import CacheError
    from kdistill.recipes import Experiment, load_recipe

    overrides = [*args.overrides, "distill.teacher_cache=off"]  # only the teacher, not a copy
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    recipe = load_recipe(resolve_recipe(args.recipe), overrides)
    run_dir = args.run_dir or Path("runs") / recipe.name
    experiment = Experiment(recipe, run_dir, resume=True, progress=not args.quiet)
    teacher, _ = experiment.prepare_teacher()  # trained, or loaded from the run folder
    if args.layers is None:
        layers = experiment.teacher_layers()
    else:
        layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    settings = {
        "layers": layers,
        "dtype": args.dtype or recipe.distill.teacher_cache_dtype,
        "topk": args.topk if args.topk is not None else recipe.distill.teacher_cache_topk,
    }
    out = args.out or run_dir / "teacher_cache"
    if not args.force:
        try:
            cache = TeacherCache.open(out, teacher, experiment.splits.train, **settings)
            if cache.layers == layers:
                print(f"up to date (--force rebuilds it)\n{cache.describe()}")
                return 0
        except CacheError:
            pass
    cache = build_teacher_cache(
        teacher, experiment.splits.train, out, progress=not args.quiet, **settings
    )
    print(cache.describe())
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """`kdistill bench`: runs bench/bench_speed.py of the source checkout (with --versus,
    bench/bench_versus.py: kdistill against torchdistill and a plain PyTorch loop)."""
    import importlib.util

    name = "bench_versus.py" if args.versus else "bench_speed.py"
    script = Path(__file__).resolve().parents[2] / "bench" / name
    if not script.exists():
        raise KdistillError(
            f"{script}: not found; the benchmark lives in the bench/ folder of a source "
            "checkout (install it with pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("kdistill_bench_speed", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = VERSUS_OPTIONS if args.versus else BENCH_OPTIONS
    argv = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key in options and value is not None
    ]
    flags = ["quick"] + (["compile", "bf16"] if args.versus else [])
    return module.main(argv + [f"--{flag}" for flag in flags if getattr(args, flag)])


BENCH_OPTIONS = ("json", "pairs", "batch_size", "threads", "steps", "warmup", "samples", "repeats")
VERSUS_OPTIONS = ("json", "pairs", "batch_size", "threads", "steps", "repeats", "device")


def list_recipes(args: argparse.Namespace) -> int:
    for path in sorted(BUILTIN_RECIPES.glob("*.yaml")):
        print(f"{path.stem}\t{path}")
    return 0


DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
}


def _yaml_mapping(text: str | None, option: str) -> dict:
    import yaml

    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KdistillError(f"{option} {text!r}: not valid YAML ({error})") from None
    if not isinstance(value, dict):
        raise KdistillError(f"{option} {text!r}: expected a mapping such as '{{width: 8}}'")
    return value


def layers_command(args: argparse.Namespace) -> int:
    """`kdistill layers`: layer names and shapes of any model spec, and proposed stage pairs."""
    import torch

    from kdistill.layers import describe_layers, layers_table, pairs_table, propose_pairs
    from kdistill.models import list_models, model_from_spec

    if args.list:
        print("\n".join(list_models()))
        return 0
    try:
        input_shape = tuple(int(size) for size in args.input.split(","))
    except ValueError:
        raise KdistillError(
            f"--input {args.input!r}: expected sizes like 1,28,28 (C,H,W) or 16 (tokens)"
        ) from None
    if not input_shape or min(input_shape) < 1:
        raise KdistillError(f"--input {args.input!r}: expected positive sizes")
    if args.batch < 1:
        raise KdistillError(f"--batch {args.batch}: expected a positive batch size")
    if bool(args.teacher) != bool(args.student):
        raise KdistillError("give both --teacher and --student, or one model spec")
    if not (args.model or args.teacher):
        raise KdistillError("name a model spec, or --teacher and --student (see --list)")
    dtype = getattr(torch, DTYPES[args.dtype])
    # a registry model also gets the sizes a recipe would give it; other specs only their kwargs
    sizes = {
        "in_channels": input_shape[0],
        "num_classes": args.classes,
        "image_size": input_shape[-1],
    }
    shown = f"input {args.batch}×{'×'.join(map(str, input_shape))} {DTYPES[args.dtype]}"

    def build(spec: str, kwargs_text: str | None, option: str):
        kwargs = _yaml_mapping(kwargs_text, option)
        torch.manual_seed(0)
        model = model_from_spec(spec, kwargs, data_sizes=sizes)
        return describe_layers(model, input_shape, batch_size=args.batch, dtype=dtype)

    if args.model:
        layers = build(args.model, args.kwargs, "--kwargs")
        print(layers_table(layers, f"## {args.model} ({shown})"))
    if args.teacher:
        teacher = build(args.teacher, args.teacher_kwargs, "--teacher-kwargs")
        student = build(args.student, args.student_kwargs, "--student-kwargs")
        print(layers_table(teacher, f"## teacher {args.teacher} ({shown})"), "\n")
        print(layers_table(student, f"## student {args.student} ({shown})"), "\n")
        print("## proposed pairs\n")
        print(pairs_table(propose_pairs(teacher, student)))
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

    compress = commands.add_parser(
        "compress", help="prune the teacher, distill it, quantize to int8; cost at each stage"
    )
    compress.add_argument("recipe", help="a recipe with a compress: section (file or built-in)")
    compress.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set compress.channels=0.5 (repeatable)",
    )
    compress.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    compress.add_argument("--data-root", help="folder holding the dataset files")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(handler=compress_command)

    cache = commands.add_parser(
        "cache", help="store the teacher's outputs over a recipe's training split (offline KD)"
    )
    cache.add_argument("recipe", help="a recipe YAML file or a built-in recipe name")
    cache.add_argument("--out", type=Path, help="cache folder (default: <run dir>/teacher_cache)")
    cache.add_argument("--run-dir", type=Path, help="run folder (default: runs/<recipe name>)")
    cache.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    cache.add_argument("--topk", type=int, help="keep only the k largest logits per sample")
    cache.add_argument("--layers", help="comma-separated teacher layers to store too")
    cache.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--data-root", help="folder holding the dataset files")
    cache.add_argument("--quiet", action="store_true", help="no progress bars")
    cache.set_defaults(handler=cache_command)

    bench = commands.add_parser("bench", help="speed and memory: alone, online, cached, build")
    bench.add_argument("--json", type=Path, help="also write the results as JSON")
    bench.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    bench.add_argument("--pairs", help="comma-separated: classic, classic_mini, resnet")
    bench.add_argument("--batch-size", type=int)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--steps", type=int)
    bench.add_argument("--warmup", type=int)
    bench.add_argument("--samples", type=int, help="samples of the cache-build measurement")
    bench.add_argument(
        "--repeats",
        type=int,
        help="fresh processes per configuration, the fastest kept (--versus: round-robin rounds)",
    )
    bench.add_argument(
        "--versus",
        action="store_true",
        help="kdistill against torchdistill (when it imports) and a plain PyTorch loop, online, "
        "cached and kd.fit end to end, round-robin in one process (bench/bench_versus.py)",
    )
    bench.add_argument("--compile", action="store_true", help="--versus: also torch.compile")
    bench.add_argument("--bf16", action="store_true", help="--versus: also a bf16 teacher")
    bench.add_argument("--device", help="--versus: cpu (default) or cuda")
    bench.set_defaults(handler=bench_command)

    layers = commands.add_parser(
        "layers", help="each module's name, output shape and parameters; proposed stage pairs"
    )
    specs_help = (
        "a model spec as in a recipe: a registry name (see --list), package.module:callable, "
        "torchvision:<name>, timm:<name>, hf:<model_type> or hf:<folder>"
    )
    layers.add_argument("model", nargs="?", help=specs_help)
    layers.add_argument("--kwargs", help="the model's kwargs as YAML, e.g. '{width: 8}'")
    layers.add_argument("--teacher", help="a teacher model spec: show both and propose pairs")
    layers.add_argument("--teacher-kwargs", help="the teacher's kwargs as YAML")
    layers.add_argument("--student", help="a student model spec: show both and propose pairs")
    layers.add_argument("--student-kwargs", help="the student's kwargs as YAML")
    layers.add_argument(
        "--input",
        default="1,28,28",
        help="shape of ONE sample, no batch dimension: C,H,W for images (default 1,28,28), "
        "L for a sequence of L token ids (with --dtype long)",
    )
    layers.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="dtype of the zero input (default float32; long for token ids)",
    )
    layers.add_argument("--batch", type=int, default=2, help="batch size of the input (default 2)")
    layers.add_argument(
        "--classes", type=int, default=10, help="num_classes of registry models (default 10)"
    )
    layers.add_argument("--list", action="store_true", help="list the registry's model names")
    layers.set_defaults(handler=layers_command)

    recipes = commands.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(handler=list_recipes)
    return parser


def _stdout_closed() -> int:
    """The reader of our output went away (`kdistill layers … | head`): stop quietly, as Unix
    tools do, with the status of a process ended by SIGPIPE (128 + 13). Standard output is
    pointed at /dev/null so that the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # large activations reused every step instead of mapped anew: no page faults (allocator.py;
    # torchrun workers run this too; KDISTILL_RETAIN_MEMORY=0 opts out)
    retain_freed_memory()
    started = time.perf_counter()
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
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
