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
DEFAULT_RECIPE = "demo"


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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe without training: build every model, run one batch through the "
        "teacher, each student and each method's terms, time a few steps of each training, and "
        "print the plan with an estimate of the wall time",
    )


def run_command(args: argparse.Namespace, recipe_arg: str) -> int:
    from kdistill.engine.distributed import cleanup, init_distributed
    from kdistill.recipes import Experiment, load_recipe
    from kdistill.report.writer import run_files, write_run_report

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
    if args.dry_run:
        from kdistill.recipes.rehearsal import dry_run

        print(dry_run(recipe, out_dir, methods).text())
        return 0
    world = init_distributed(recipe.train.device)  # under torchrun: join the process group
    try:
        experiment = Experiment(recipe, out_dir, resume=args.resume, progress=not args.quiet)
        summary = experiment.run(methods)
        if not world.is_main:  # rank 0 writes the report and prints
            return 0
        command = "kdistill " + " ".join(shlex.quote(a) for a in args.argv)
        table, written = write_run_report(summary, recipe, command)
        experiment.close_trackers([out_dir / name for name in written])
        print(table)
        print(
            f"\n{out_dir}: {', '.join(run_files(out_dir, written))} "
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
    command = "kdistill " + " ".join(shlex.quote(a) for a in args.argv)
    table = write_compress_report(summary, recipe, command)
    print(table)
    print(
        f"\n{out_dir}: report.md, report.html, results.json, export/ "
        f"({summary.seconds / 60:.1f} min)"
    )
    return 0


def cache_command(args: argparse.Namespace) -> int:
    """`kdistill cache <recipe>`: the teacher's outputs over the training split, stored once."""
    from kdistill.recipes import Experiment, load_recipe

    given = [*args.overrides] + ([f"data.root={args.data_root}"] if args.data_root else [])
    recipe = load_recipe(resolve_recipe(args.recipe), given)  # read once
    wanted = recipe.distill.teacher_cache
    recipe.distill.teacher_cache = "off"  # prepare only the teacher, not a copy of its outputs
    run_dir = args.run_dir or Path("runs") / recipe.name
    experiment = Experiment(recipe, run_dir, resume=True, progress=not args.quiet)
    teacher, _ = experiment.prepare_teacher()  # trained, or loaded from the run folder
    if not isinstance(wanted, str):  # stored top-k token distributions (language_modeling)
        return _token_cache_command(args, experiment, teacher, wanted, run_dir)
    layers = None
    if args.layers is not None:
        layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    cache, built = experiment.disk_teacher_cache(
        teacher,
        args.out,
        layers=layers,
        dtype=args.dtype,
        topk=args.topk,
        force=args.force,
    )
    print(cache.describe() if built else f"up to date (--force rebuilds it)\n{cache.describe()}")
    if wanted != "disk" and args.out is None:
        where = "in memory" if wanted == "memory" else "nowhere (off)"
        print(
            f"note: the recipe keeps the teacher's outputs {where} (distill.teacher_cache: "
            f"{wanted}); `kdistill run` reads {cache.directory} only with --set "
            "distill.teacher_cache=disk"
        )
    return 0


def _token_cache_command(args, experiment, teacher, spec, run_dir: Path) -> int:
    """`kdistill cache` for a recipe whose teacher_cache stores top-k token distributions."""
    from kdistill.distill.teacher.store import TokenTeacherCache, build_token_cache
    from kdistill.errors import CacheError

    if args.layers:
        raise KdistillError("--layers: stored token distributions hold no teacher layers")
    settings = {
        "topk": args.topk if args.topk is not None else spec.topk,
        "temperature": spec.temperature,
        "dtype": args.dtype or spec.dtype,
    }
    out = args.out or run_dir / "teacher_cache"
    if not args.force:
        try:
            cache = TokenTeacherCache.open(out, teacher, experiment.splits.train, **settings)
            print(f"up to date (--force rebuilds it)\n{cache.describe()}")
            return 0
        except CacheError:
            pass
    cache = build_token_cache(
        teacher,
        experiment.splits.train,
        out,
        measure_positions=spec.measure_positions,
        progress=not args.quiet,
        **settings,
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
    try:
        return module.main(argv + [f"--{flag}" for flag in flags if getattr(args, flag)])
    except SystemExit as stop:  # the script's own refusal: shown as kdistill's errors are
        if isinstance(stop.code, str):
            raise KdistillError(stop.code) from None
        raise


BENCH_OPTIONS = ("json", "pairs", "batch_size", "threads", "steps", "warmup", "samples", "repeats")
VERSUS_OPTIONS = ("json", "pairs", "batch_size", "threads", "steps", "repeats", "device")


def check_command(args: argparse.Namespace) -> int:
    """`kdistill check`: the self-checks of a teacher / student pair (`kdistill.recipes.check`);
    exit status 1 when a check fails."""
    import json

    from kdistill.recipes.check import CHECKS, check_models, check_recipe

    checks = list(CHECKS)
    if args.checks:
        checks = [name.strip() for name in args.checks.split(",") if name.strip()]
        unknown = sorted(set(checks) - set(CHECKS))
        if unknown:
            raise KdistillError(f"--checks: unknown {unknown}; choose among {list(CHECKS)}")
    for option in ("batches", "samples", "length"):
        if getattr(args, option) < 1:
            raise KdistillError(f"--{option} {getattr(args, option)}: expected a positive number")
    if args.recipe is not None:
        from kdistill.recipes import load_recipe

        overrides = list(args.overrides)
        if args.data_root:
            overrides.append(f"data.root={args.data_root}")
        recipe = load_recipe(resolve_recipe(args.recipe), overrides)
        report = check_recipe(
            recipe,
            args.run_dir,
            teacher_spec=args.teacher,
            student_spec=args.student,
            batches=args.batches,
            samples=args.samples,
            length=args.length,
            checks=checks,
            device=args.device,
        )
    else:
        if not (args.teacher and args.student):
            raise KdistillError("give a recipe, or both --teacher and --student model specs")
        report = check_models(
            args.teacher,
            args.student,
            vocab_size=args.vocab_size,
            samples=args.samples,
            length=args.length,
            checks=checks,
            device=args.device or "cpu",
        )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
    return 0 if report.passed else 1


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

    from kdistill.distill.layers import describe_layers, layers_table, pairs_table, propose_pairs
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


def init_command(args: argparse.Namespace) -> int:
    """`kdistill init`: write a commented starter recipe for your own models and data."""
    from kdistill.recipes.starter import starter_recipe

    out = Path(args.out)
    if out.exists() and not args.force:
        raise KdistillError(f"{out}: already exists; choose another --out, or --force")
    text = starter_recipe(
        args.teacher,
        args.student,
        args.data,
        task=args.task,
        teacher_kwargs=_yaml_mapping(args.teacher_kwargs, "--teacher-kwargs"),
        student_kwargs=_yaml_mapping(args.student_kwargs, "--student-kwargs"),
        teacher_checkpoint=args.teacher_checkpoint,
        name=args.name or out.stem,
        command="kdistill " + " ".join(shlex.quote(a) for a in args.argv),
        file_name=str(out),
    )
    from kdistill.io import atomic_write_text

    atomic_write_text(out, text)
    print(
        f"{out}: a starter recipe (validated). Next:\n"
        f"  kdistill run {shlex.quote(str(out))} --dry-run   # checks, plan, time estimate\n"
        f"  kdistill run {shlex.quote(str(out))}"
    )
    return 0


def reference_command(args: argparse.Namespace) -> int:
    """`kdistill reference`: every recipe field, generated from the schema (Markdown)."""
    from kdistill.recipes.reference import recipe_reference

    text = recipe_reference()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from kdistill.io import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"{args.out}: {text.count(chr(10))} lines")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """`kdistill report <results.json>`: the results table rebuilt from a run's results file;
    with --out, the whole report (report.md, report.html, plots) written there."""
    from kdistill.report.regenerate import regenerate_report, results_table

    print(results_table(args.results, args.recipe))
    if args.out is not None:
        written = regenerate_report(args.results, args.out, args.recipe)
        print(f"{args.out}: {', '.join(written)}")
    return 0


def version_text() -> str:
    """ "kdistill 0.1.0 (torch 2.13.0+cpu, Python 3.11.2)" """
    import platform

    import torch

    import kdistill

    return (
        f"kdistill {kdistill.__version__} (torch {torch.__version__}, "
        f"Python {platform.python_version()})"
    )


EXAMPLES = {
    "run": """examples:
  kdistill run recipes/fashion_mnist.yaml --dry-run       # check it, see the plan and the time
  kdistill run recipes/fashion_mnist.yaml --set train.epochs=3 --seeds 1 --no-tune
  kdistill run my_recipe.yaml --resume                    # continue an interrupted run""",
    "demo": """examples:
  kdistill demo --dry-run     # what the demo will do and how long it will take here
  kdistill demo               # all labels vs 1,000 labels: alone, KD, pseudo-labels, 3 seeds
  kdistill demo --seeds 1 --no-tune --set train.epochs=2   # a quick look""",
    "init": """examples:
  kdistill init --teacher mypkg.models:Big --student mypkg.models:Small --data data/images
  kdistill init --teacher resnet20 --student resnet8 --data train.npz,test.npz --out kd.yaml
  kdistill init --teacher mypkg.nets:Teacher --teacher-kwargs '{depth: 18}' \\
      --student mypkg.nets:Student --data fashion_mnist""",
    "compress": """examples:
  kdistill compress fashion_mnist_compress
  kdistill compress fashion_mnist_compress --set compress.channels=0.5 --out runs/half""",
    "cache": """examples:
  kdistill cache recipes/fashion_mnist.yaml                  # logits of the training split
  kdistill cache recipes/fashion_mnist.yaml --dtype float16 --topk 5   # smaller, approximate""",
    "bench": """examples:
  kdistill bench --quick
  kdistill bench --pairs classic,resnet --json bench/results/speed.json""",
    "layers": """examples:
  kdistill layers resnet20 --input 3,32,32
  kdistill layers --teacher classic_teacher --student middle_student   # and proposed pairs
  kdistill layers mypkg.models:MyNet --kwargs '{width: 8}' --input 1,28,28""",
    "reference": """examples:
  kdistill reference --out docs/recipe-reference.md   # what make reference does
  kdistill reference | grep batch_size""",
    "check": """examples:
  kdistill check recipes/kjv_lm.yaml                   # its teacher, students and divergences
  kdistill check recipes/kjv_lm.yaml --run-dir runs/kjv_lm --batches 2 --json
  kdistill check --teacher hf:path/to/teacher --student hf:path/to/student""",
    "report": """examples:
  kdistill report runs/demo/results.json             # the table, rebuilt from the file
  kdistill report docs/results/demo.json --out /tmp/demo   # report.md, report.html, plots""",
    "recipes": """examples:
  kdistill recipes
  kdistill run fashion_mnist_feature --dry-run""",
}


def _subcommand(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command parser whose --help ends with its examples (`EXAMPLES`)."""
    return commands.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """Each sub-command sets `handler`: parsed arguments in, exit code out."""
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description="Knowledge distillation for PyTorch.",
        epilog="""examples:
  kdistill demo                       # the default experiment on Fashion-MNIST
  kdistill init --teacher mypkg.models:Big --student mypkg.models:Small --data data/images
  kdistill run recipe.yaml --dry-run  # check a recipe, see its plan and how long it will take
  kdistill <command> --help           # each command's options and examples""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=version_text(), help="show the versions and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    run = _subcommand(commands, "run", "run a recipe: teacher, students alone, distilled")
    run.add_argument("recipe", help="a recipe YAML file or a built-in recipe name")
    add_run_options(run)
    run.set_defaults(handler=lambda args: run_command(args, args.recipe))

    demo = _subcommand(commands, "demo", f"run the default recipe ({DEFAULT_RECIPE})")
    add_run_options(demo)
    demo.set_defaults(handler=lambda args: run_command(args, DEFAULT_RECIPE))

    compress = _subcommand(
        commands, "compress", "prune the teacher, distill it, quantize to int8; cost at each stage"
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

    cache = _subcommand(
        commands, "cache", "store the teacher's outputs over a recipe's training split (offline KD)"
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

    bench = _subcommand(commands, "bench", "speed and memory: alone, online, cached, build")
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

    layers = _subcommand(
        commands, "layers", "each module's name, output shape and parameters; proposed stage pairs"
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

    check = _subcommand(
        commands,
        "check",
        "self-check a teacher / student pair: loss 0 at student = teacher, padding side, "
        "micro-batches, β / α endpoints, teacher mode, vocabularies",
    )
    check.add_argument("recipe", nargs="?", help="a recipe YAML file or a built-in recipe name")
    check.add_argument("--teacher", help="a teacher model spec (e.g. hf:<folder>), replacing the "
                       "recipe's")  # fmt: skip
    check.add_argument("--student", help="a student model spec, replacing the recipe's students")
    check.add_argument("--run-dir", type=Path, help="run folder holding the recipe's trained "
                       "teacher and tokenizer (default: runs/<recipe name>)")  # fmt: skip
    check.add_argument("--batches", type=int, default=1, help="training batches (default 1)")
    check.add_argument("--samples", type=int, default=4, help="sequences per batch (default 4)")
    check.add_argument("--length", type=int, default=64, help="tokens per sequence (default 64)")
    check.add_argument("--vocab-size", type=int, help="without a recipe: the tokenizer's size")
    check.add_argument("--checks", help="comma-separated subset of: identity, chunked, padding, "
                       "micro_batches, endpoints, teacher")  # fmt: skip
    check.add_argument("--device", help="cpu or cuda (default: the recipe's device, else cpu)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--data-root", help="folder holding the dataset files")
    check.set_defaults(handler=check_command)

    report = _subcommand(
        commands, "report", "regenerate a run's results table and report from its results.json"
    )
    report.add_argument("results", type=Path, help="a results.json written by `kdistill run`")
    report.add_argument("--out", type=Path, help="also write report.md, report.html and plots here")
    report.add_argument(
        "--recipe", help="the run's recipe (default: recipe.yaml beside the file, else built in)"
    )
    report.set_defaults(handler=report_command)

    recipes = _subcommand(commands, "recipes", "list the built-in recipes")
    recipes.set_defaults(handler=list_recipes)

    init = _subcommand(
        commands, "init", "write a commented starter recipe for your own models and data"
    )
    init_spec = specs_help.replace("(see --list)", "(kdistill layers --list)")
    init.add_argument("--teacher", required=True, help=init_spec)
    init.add_argument("--student", required=True, help=init_spec)
    init.add_argument(
        "--data",
        required=True,
        help="your data, in any kind the task reads (docs/data-kinds.md): a folder (image "
        "classes, masks, COCO / YOLO, text files, jsonl), one text file, two files "
        "'train.npz,test.npz' or 'train.jsonl,test.jsonl', a factory package.module:function, "
        "or a built-in set (fashion_mnist, digits, fashion_mnist_scenes, kjv)",
    )
    init.add_argument(
        "--task",
        default="classification",
        help="classification (default), segmentation, detection, multitask, language_modeling, "
        "completion or pkg.module:Task",
    )
    init.add_argument("--teacher-kwargs", help="the teacher's kwargs as YAML, e.g. '{width: 32}'")
    init.add_argument("--student-kwargs", help="the student's kwargs as YAML, e.g. '{width: 8}'")
    init.add_argument(
        "--teacher-checkpoint",
        help="the teacher's trained weights (safetensors / .pt state dict): it is not trained "
        "again, and the recipe reads the inputs as they are (normalize: none)",
    )
    init.add_argument("--name", help="the recipe's name (default: the file name)")
    init.add_argument(
        "--out", default="recipe.yaml", help="the file to write (default: recipe.yaml)"
    )
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(handler=init_command)

    reference = _subcommand(
        commands, "reference", "every recipe field: type, default, constraint, meaning (Markdown)"
    )
    reference.add_argument("--out", type=Path, help="write it to this file (default: stdout)")
    reference.set_defaults(handler=reference_command)
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
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command, for reports
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
    except Exception as error:  # noqa: BLE001 - no raw traceback reaches the user
        if os.environ.get("KDISTILL_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or "(no message)"
        if len(message) > 600:
            message = message[:600] + " …"
        print(
            f"kdistill: error: {type(error).__name__}: {message} "
            "(KDISTILL_TRACEBACK=1 shows where it came from)",
            file=sys.stderr,
        )
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
