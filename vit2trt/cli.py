"""The `vit2trt` command line."""
from __future__ import annotations

import inspect as pyinspect
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from . import __version__
from .errors import Vit2TrtError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Compress exported Vision Transformers by ONNX graph surgery and build TensorRT engines.",
)
out = Console()
err = Console(stderr=True)
UNWRAPPED_WIDTH = 10_000   # columns a table may take in a log: no cell of ours comes near it
_state = {"debug": False}


def _version(value: bool):
    if value:
        out.print(f"vit2trt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when a command fails."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = debug


@contextmanager
def _user_errors():
    """Input problems end with exit code 2 and one message; --debug shows the traceback."""
    try:
        yield
    except Vit2TrtError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)


def print_table(console: Console, table: Table) -> None:
    """A terminal gets the table at its width (every table here is laid out to fit 80 columns). A log, a pipe
    or CI gets it at its natural width, unwrapped: rich would guess 80 columns there and fold cells apart,
    and a log is read in windows of any width."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(UNWRAPPED_WIDTH), table).maximum
    whole = console.options.update_width(max(natural, console.width))
    console.print(Segments(console.render(table, whole)), crop=False)


def _parse_model_args(pairs: List[str]) -> dict:
    """--arg depth=2 --arg class_token=false -> {'depth': 2, 'class_token': False}."""
    from .errors import ExportError

    parsed = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ExportError(f"--arg '{pair}' is not KEY=VALUE (for example --arg depth=6).")
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            parsed[key] = lowered == "true"
        elif lowered in ("none", "null"):
            parsed[key] = None
        else:
            try:
                parsed[key] = json.loads(raw)
            except ValueError:
                parsed[key] = raw
    return parsed


@app.command()
def export(
    model: str = typer.Argument(..., help="timm:<name> (e.g. timm:deit_small_patch16_224) or hf:ViTForImageClassification"),
    out_path: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write (a reference record is written beside it)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local checkpoint: .pth/.pt (with or without a 'model' key) or .safetensors. Without it: seeded random init."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (opset 17) or dynamo (its default opset, external data)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Build the model for this input size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random init and of the check input."),
    arg: List[str] = typer.Option([], "--arg", help="Constructor argument KEY=VALUE, repeatable (e.g. --arg depth=6 --arg global_pool=avg)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: 17 for torchscript, the exporter's own for dynamo)."),
):
    """Export a timm or Hugging Face ViT to ONNX with a dynamic batch axis. Nothing is downloaded."""
    with _user_errors():
        from .converter.deploy.export import export_model

        with err.status(f"exporting {model} with the {exporter} exporter ..."):
            result = export_model(model, out_path, weights=str(weights) if weights else None, exporter=exporter,
                                  img_size=img_size, seed=seed, model_args=_parse_model_args(arg), opset=opset)
        rel = result.max_abs_diff / max(result.max_abs_ref, 1e-12)
        out.print(f"wrote {', '.join(str(p) for p in result.files)}")
        out.print(f"ONNX Runtime vs PyTorch on a seeded batch of 2: max abs diff {result.max_abs_diff:.3g} "
                  f"(relative to max |logit| {rel:.2g})")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="An exported ViT .onnx file (external data next to it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full description as JSON."),
    build: bool = typer.Option(True, "--build/--no-build", help="Check that TensorRT (RTX on a CPU machine) parses and builds the graph."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Image size to read a graph exported with a dynamic size."),
):
    """Describe the ViT inside an ONNX graph: tokens, every block's attention and FFN, the head, FLOPs."""
    with _user_errors():
        from .converter.deploy.engine import build_engine
        from .converter.graph import read_vit

        with err.status(f"reading {model} ..."):
            graph = read_vit(model, img_size=img_size)
        if build:
            with err.status("building a TensorRT engine ..."):
                graph.build = build_engine(model)
        if as_json:
            print(graph.to_json())
        else:
            _print_description(graph)


def method_option_parameters() -> list[pyinspect.Parameter]:
    """One command-line option per method option in the registry, grouped by method in --help; an
    option several methods declare (--target-flops, --stages, --multiple) appears once."""
    from .passes.methods import REGISTRY, available, option_fields

    owners: dict[str, list] = {}
    for name in available():
        for spec in option_fields(REGISTRY[name].Options):
            owners.setdefault(spec.name, []).append((REGISTRY[name], spec))
    params = []
    for field_name, declared in owners.items():
        method, spec = declared[0]
        meta = spec.metadata
        cli_type = meta["cli_type"] or (float if spec.default is None else type(spec.default))
        decls = [f"{meta['flag']}/{meta['secondary']}"] if meta["secondary"] else [meta["flag"]]
        group = ", ".join(m.name for m, _ in declared)   # plain help has no panels: a prefix groups them
        # None: not given (a value equal to the method's default is still the user's and still routed).
        shown = f"  [default: {spec.default}]" if spec.default not in (None, False) else ""
        params.append(pyinspect.Parameter(
            field_name, pyinspect.Parameter.KEYWORD_ONLY, annotation=Optional[cli_type],
            default=typer.Option(None, *decls, help=f"[{group}] {meta['help']}{shown}", rich_help_panel=method.title,
                                 show_default=False)))
    return params


def method_options_given(values: dict, settings: List[str]) -> dict:
    """The method options the user set: values that differ from their defaults, and --set part.option=value."""
    from .passes.methods import REGISTRY, option_fields

    specs = {f.name: f for m in REGISTRY.values() for f in option_fields(m.Options)}
    # Not given: None; a plain flag (no --no- form) that is absent may also read False.
    given = {k: v for k, v in values.items() if k in specs and v is not None
             and not (v is False and not specs[k].metadata["secondary"])}
    for pair in settings:
        key, sep, raw = pair.partition("=")
        part, dot, name = key.partition(".")
        if not sep or not dot or not part or not name:
            raise Vit2TrtError(f"--set '{pair}' is not METHOD.OPTION=VALUE (for example --set cait.stages=6,10).")
        spec = next((f for f in option_fields(REGISTRY[part].Options) if f.name == name), None) \
            if part in REGISTRY else None
        if spec is None:
            raise Vit2TrtError(f"--set {key}: no such method option; options are named as in decisions.json, "
                               "e.g. toast.target_flops, cait.stages, tome.r.")
        cli_type = spec.metadata["cli_type"] or (float if spec.default is None else type(spec.default))
        try:
            if cli_type is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                given[key] = raw.lower() in ("1", "true", "yes")
            else:
                given[key] = cli_type(raw)
        except ValueError:
            raise Vit2TrtError(f"--set {key}: '{raw}' is not a {cli_type.__name__}.") from None
    return given


def convert(
    model: Path = typer.Argument(..., help="An exported ViT .onnx file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: model.onnx, decisions.json, report.json, model.engine."),
    method: str = typer.Option("toast", "--method", help="Compression method: toast, tome, asvit or cait, or a composition: toast+tome, toast+asvit, cait+tome, toast+cait (structured parts run first, the token part last)."),
    set_options: List[str] = typer.Option([], "--set", metavar="METHOD.OPTION=VALUE", help="[compositions] An option for one part of a composition, e.g. --set cait.target_flops=0.8 (repeatable).", rich_help_panel="Compositions"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Folder of images (flat or an ImageFolder, read recursively; preprocessed as the reference record says) or .npy [N,C,H,W] array for the agreement check."),
    fit_images: int = typer.Option(512, "--fit-images", help="Calibration images the compensation and the sensitivity budget use at most."),
    build: bool = typer.Option(True, "--build/--no-build", help="Build a TensorRT engine of the result (--no-build: same as --engine none)."),
    engine: str = typer.Option("auto", "--engine", help="auto (TensorRT with a GPU, else TensorRT-RTX, else none), tensorrt, tensorrt-rtx or none."),
    batch: str = typer.Option("1,1,8", "--batch", help="Engine optimization profile: min,opt,max batch."),
    precision: str = typer.Option("fp32", "--precision", help="Engine precision: fp32, fp16 or bf16 (TensorRT-RTX is strongly typed: fp16 converts the graph; bf16 needs full TensorRT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the check inputs (and of healing's split, batches and augmentation)."),
    heal_images: Optional[Path] = typer.Option(None, "--heal", metavar="DIR", help="Heal right after converting: distil the original into the result on these images, as `vit2trt heal OUT --images DIR` does.", rich_help_panel="Healing"),
    heal_labels: Optional[Path] = typer.Option(None, "--heal-labels", help="As heal's --labels.", rich_help_panel="Healing"),
    heal_class_map: Optional[Path] = typer.Option(None, "--heal-class-map", help="As heal's --class-map.", rich_help_panel="Healing"),
    heal_time: float = typer.Option(900.0, "--heal-time", help="As heal's --time-limit: seconds for healing.", rich_help_panel="Healing"),
    heal_epochs: Optional[int] = typer.Option(None, "--heal-epochs", help="As heal's --epochs.", rich_help_panel="Healing"),
    heal_device: str = typer.Option("auto", "--heal-device", help="As heal's --device: auto, cpu or cuda.", rich_help_panel="Healing"),
    heal_batch: int = typer.Option(64, "--heal-batch", help="As heal's --batch.", rich_help_panel="Healing"),
    heal_lr: float = typer.Option(1e-4, "--heal-lr", help="As heal's --lr.", rich_help_panel="Healing"),
    heal_holdout: float = typer.Option(0.1, "--heal-holdout", help="As heal's --holdout.", rich_help_panel="Healing"),
    heal_recipe: str = typer.Option("features", "--heal-recipe", help="As heal's --recipe: logits, features or blocks.", rich_help_panel="Healing"),
    **method_values,
):
    """Compress a ViT graph by surgery. toast: strip zeroed QK/VO dims and FFN channels (the main path
    after masked fine-tuning); prune head dims by SCWP (--head-sparsity), or QK dims, V dims and FFN
    channels of every block by measured sensitivity (--target-flops with --calib); insert Token Channel
    Selection (--fc1/--fc2, or a whole schedule with --target-gflops). With --calib, structured pruning
    is compensated in closed form on the calibration images. tome: ToMe token merging of
    --r tokens per block. asvit: adaptive token pruning by class attention (--thresholds or
    calibrated for --target-flops). cait: consistent attention channel pruning (--channel-ratio) and
    asymmetric merging of neighbouring tokens (--stages). Methods compose with '+'. Every graph is
    native ONNX. With --heal DIR, the result is then healed on DIR's images (see `vit2trt heal`)."""
    with _user_errors():
        from .converter.convert import ConvertOptions, convert as run_convert

        options = ConvertOptions(method=method, calib=str(calib) if calib else None, fit_limit=fit_images,
                                 build=build, engine=engine, batch=_batch_profile(batch), precision=precision,
                                 seed=seed, overwrite=overwrite,
                                 **method_options_given(method_values, set_options))
        heal_options = None
        if heal_images is not None:   # bad healing options stop before converting
            from .converter.healing.heal import HealOptions
            from .converter.healing.parallel import launched_world

            if launched_world() > 1:
                raise Vit2TrtError("convert --heal runs in one process (every torchrun process would convert into "
                                   "the same --out); convert first, then run `torchrun ... -m vit2trt.cli heal OUT`.")

            heal_options = HealOptions(heal_images, heal_labels, heal_class_map, heal_time, heal_epochs, heal_device,
                                       heal_batch, heal_lr, heal_holdout, seed, heal_recipe).check()
        with _progress("converting") as report:
            result = run_convert(model, out_dir, options, progress=report)
        ratio = result.flops_before / max(result.flops_after, 1)
        out.print(f"wrote {result.out_dir}/ (model.onnx, decisions.json, report.json"
                  + (", model.engine)" if result.build and result.build.status == "built" else ")"))
        out.print(f"GFLOPs {result.flops_before / 1e9:.3f} -> {result.flops_after / 1e9:.3f} ({ratio:.2f}x fewer)")
        a = result.agreement
        line = f"agreement with the original on {a['inputs']}: relative error {a['relative_error']:.2g}"
        if "top1_agreement" in a:
            line += f", top-1 agreement {a['top1_agreement'] * 100:.0f}%"
        out.print(line)
        for note in result.notes:
            out.print(f"note: {note}", style="yellow")
        if heal_options is not None:
            from .converter.healing.heal import heal as run_heal

            with _progress("healing") as report:
                try:
                    section = run_heal(result.out_dir, heal_options, progress=report)
                except (Vit2TrtError, KeyboardInterrupt) as exc:
                    raise Vit2TrtError(f"healing failed: {exc or 'interrupted'} {result.out_dir}/ holds the converted "
                                       "model, not healed; heal it with `vit2trt heal`.") from exc
            print_table(out, heal_table(section, result.out_dir))
        if calib is not None and result.artifact.record:
            from .converter.measure.validate import validate as run_validate

            with _progress("validating against the PyTorch reference") as report:
                v = run_validate(result.out_dir, calib, limit=64, progress=report, use_folder_labels=False,
                                 flag="--calib")
            out.print(f"validation against the PyTorch reference on {v['images']} calibration inputs: top-1 "
                      f"agreement {v['top1_agreement'] * 100:.0f}%, logits cosine min {v['cosine_min']:.4f}, "
                      f"batch dependence {v['batch_dependence']:.2g} (report.json; `vit2trt validate` for more)")
        if result.build is not None and result.build.status != "unavailable":
            out.print(f"TensorRT ({result.build.backend}): {result.build.status} {result.build.message}")
            if result.build.status == "failed":
                err.print(f"error: the engine build failed; {result.out_dir}/model.onnx and report.json are kept.",
                          style="red")
                raise typer.Exit(1)


def _register_convert() -> None:
    signature = pyinspect.signature(convert, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind != pyinspect.Parameter.VAR_KEYWORD]
    params = fixed + method_option_parameters()
    convert.__signature__ = signature.replace(parameters=params)
    convert.__annotations__ = {p.name: p.annotation for p in params}
    app.command("convert")(convert)


_register_convert()


@app.command()
def plan(
    model: Path = typer.Argument(..., help="An exported ViT .onnx file."),
    calib: Path = typer.Option(..., "--calib", help="Folder of images (flat, or an ImageFolder: one subfolder per class, which labels the images) or .npy [N,C,H,W], preprocessed as the reference record says; one part fits the methods, the rest (--holdout) judges them."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: plan.md, plan.json, plan.png and the chosen model as convert writes it."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class per image of a flat folder or .npy (as validate reads them): the drop is then top-1 accuracy; without labels, top-1 disagreement with the original."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="With an ImageFolder --calib: JSON list of folder names (position = class index) or {\"folder\": index}, when the head's class order is not the folders' sorted order."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Choose the most accurate candidate at least this much faster than the original."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Choose the fastest candidate whose top-1 drop is confirmed at most this fraction (0.01 = one point): the one-sided 95% upper bound of the drop measured on the judging images must fit."),
    runtime: str = typer.Option("ort", "--runtime", help="Where latency is measured: ort (ONNX Runtime CPU). tensorrt is refused for now: timing engines needs full TensorRT and a GPU."),
    batch: int = typer.Option(1, "--batch", help="Batch size the latency is measured at."),
    time_limit: float = typer.Option(900, "--time-limit", help="Seconds the search may take; it then keeps the best found so far."),
    calib_limit: Optional[int] = typer.Option(None, "--calib-limit", help="Calibration images read at most (default: all)."),
    holdout: float = typer.Option(0.5, "--holdout", help="Without --val: fraction of the --calib images held out for judging (never fitted on)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Labelled images (flat folder with --val-labels, an ImageFolder, or .npy with --val-labels) that judge every candidate, all of them; --calib is then fitted on whole. Never give images of --calib."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Class per image of a flat --val folder or .npy, as validate reads them."),
    val_class_map: Optional[Path] = typer.Option(None, "--val-class-map", help="With an ImageFolder --val: JSON list of folder names (position = class index) or {\"folder\": index}."),
    heal_images: Optional[Path] = typer.Option(None, "--heal", help="Images to heal the candidates near the goal on (as `vit2trt heal --images`: distillation from the original, labels optional) before judging them; never the --val images.", rich_help_panel="Healing"),
    heal_labels: Optional[Path] = typer.Option(None, "--heal-labels", help="Class per image of a flat --heal folder: adds the label loss.", rich_help_panel="Healing"),
    heal_class_map: Optional[Path] = typer.Option(None, "--heal-class-map", help="With an ImageFolder --heal: its folders' class indices (JSON); heals with labels.", rich_help_panel="Healing"),
    heal_time: float = typer.Option(300, "--heal-time", help="Seconds of healing per candidate; all of it counts in --time-limit.", rich_help_panel="Healing"),
    heal_epochs: Optional[int] = typer.Option(None, "--heal-epochs", help="Passes over the --heal images per candidate instead of --heal-time (reproducible; --heal-time still caps it).", rich_help_panel="Healing"),
    heal_batch: int = typer.Option(32, "--heal-batch", help="Healing batch size.", rich_help_panel="Healing"),
    heal_lr: Optional[float] = typer.Option(None, "--heal-lr", help="Healing learning rate (AdamW, warm-up then cosine). Default: 1e-4 for a candidate far from the original (KL >= 0.3 on the judging images), 2e-5 for a nearer one, which 1e-4 would undo.", rich_help_panel="Healing"),
    heal_limit: Optional[int] = typer.Option(None, "--heal-limit", help="--heal images read at most (spread over the classes of an ImageFolder).", rich_help_panel="Healing"),
    heal_device: str = typer.Option("auto", "--heal-device", help="auto (CUDA where present), cpu or cuda.", rich_help_panel="Healing"),
    methods: Optional[str] = typer.Option(None, "--methods", help="Families to search, comma-separated (default: tome, cait, toast, toast+tome, cait+tome, asvit where it applies)."),
    rounds: int = typer.Option(15, "--rounds", help="Back-to-back timing pairs per candidate."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    build: bool = typer.Option(True, "--build/--no-build", help="Build a TensorRT engine of the chosen model."),
    engine: str = typer.Option("auto", "--engine", help="auto, tensorrt, tensorrt-rtx or none (the chosen model's engine)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit / held-out split and of the timing input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """Find the fastest compressed model within an accuracy budget (--max-drop), or the most accurate
    one at a speed (--target-speedup): searches methods, compositions and their budgets coarse to fine,
    measuring every candidate's latency against the original and its accuracy on held-out images
    (all of --val when given), and choosing by the drop's one-sided 95% upper bound. With --heal,
    the candidates near the goal are healed (distilled from the original) before the choice.
    Ctrl-C or --time-limit keeps the best model found so far, healing included."""
    with _user_errors():
        from .converter.planning.planner import PlanOptions, credible_speedup, plan as run_plan
        from .converter.measure.speedup import terminal_legend

        options = PlanOptions(calib=str(calib), out_dir=str(out_dir), labels=str(labels) if labels else None,
                              class_map=str(class_map) if class_map else None,
                              target_speedup=target_speedup, max_drop=max_drop, runtime=runtime, batch=batch,
                              time_limit=time_limit, calib_limit=calib_limit, holdout=holdout,
                              val=str(val) if val else None, val_labels=str(val_labels) if val_labels else None,
                              val_class_map=str(val_class_map) if val_class_map else None,
                              heal=str(heal_images) if heal_images else None,
                              heal_labels=str(heal_labels) if heal_labels else None,
                              heal_class_map=str(heal_class_map) if heal_class_map else None, heal_time=heal_time,
                              heal_epochs=heal_epochs, heal_batch=heal_batch, heal_lr=heal_lr, heal_limit=heal_limit,
                              heal_device=heal_device, threads=threads,
                              rounds=rounds, methods=methods.split(",") if methods else None, build=build,
                              engine=engine, seed=seed, overwrite=overwrite)
        with _progress("planning") as report:
            result = run_plan(model, options, progress=report)
        for table in plan_tables(result, runtime, batch):
            print_table(out, table)
        out.print(terminal_legend())
        out.print("<=95%: the drop's one-sided 95% upper confidence bound (pt), which the choice goes by.")
        for note in result.notes:
            out.print(f"note: {note}", style="yellow")
        if result.chosen is None:
            err.print(f"error: no candidate met the budget; {result.out_dir}/plan.md lists what was tried.", style="red")
            raise typer.Exit(1)
        chosen = next(name for name, c in short_names(result) if c is result.chosen)
        out.print(f"chose {chosen}, {escape(result.chosen.label)}: {credible_speedup(result.chosen):.2f}x faster "
                  f"(measured, at most the FLOPs ratio), top-1 drop "
                  f"{result.chosen.drop * 100:+.2f} pt on held-out images (at most {result.chosen.drop_bound * 100:.2f} pt, "
                  f"95% upper bound); wrote {result.out_dir}/ (plan.md, "
                  "plan.json, plan.png, model.onnx, decisions.json, report)")


def short_names(result) -> list[tuple[str, object]]:
    """The candidates the terminal shows (refused ones are in plan.md), named c1, c2, ... in search order."""
    return [(f"c{i}", c) for i, c in enumerate((c for c in result.candidates if not c.error), start=1)]


def plan_tables(result, runtime: str, batch: int) -> list[Table]:
    """The candidates under their short names, and under them the legend with each one's settings in full:
    a label such as "toast+tome r=4, structure to 0.95 of ToMe's FLOPs" in a column of its own would leave
    an 80-column table no room but to fold every cell into fragments."""
    from .converter.planning.planner import figure
    from .converter.measure.speedup import format_speedup

    table = Table(box=box.SIMPLE_HEAD, title=f"candidates (runtime {runtime}, batch {batch})", title_justify="left",
                  pad_edge=False, collapse_padding=True, show_edge=False)
    for column in ("", "", "FLOPs x", "speedup [95%]", "agree", "KL", "top-1", "drop pt", "<=95%"):
        table.add_column(column, justify="right" if column else "left", no_wrap=True)
    legend = Table.grid(padding=(0, 2))
    legend.add_column(no_wrap=True)
    legend.add_column()   # a label longer than the terminal wraps between words, under itself
    for name, c in short_names(result):
        mark = "chosen" if c is result.chosen else ("pareto" if c.pareto else "")
        table.add_row(name, mark, f"{c.flops_ratio:.2f}", format_speedup(figure(c), ascii=True),
                      f"{c.agreement * 100:.1f}%", f"{c.kl:.4f}",
                      f"{c.accuracy * 100:.2f}%" if c.accuracy is not None else "-", f"{c.drop * 100:+.2f}",
                      f"{c.drop_bound * 100:.2f}")
        healed = "" if c.drop_before_heal is None else \
            f" (drop {c.drop_before_heal * 100:+.2f} -> {c.drop * 100:+.2f} pt)"
        legend.add_row(name, escape(c.label + healed))
    return [table, legend]


@app.command("tune-thresholds")
def tune_thresholds(
    model: Path = typer.Argument(..., help="An exported ViT .onnx file (with its .reference.json from `vit2trt export`)."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Thresholds JSON to write, for `convert --method asvit --thresholds FILE`."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Folder of images (flat or an ImageFolder, read recursively) or .npy [N,C,H,W] to tune on (default: 16 seeded noise images, which says little)."),
    target_flops: float = typer.Option(0.65, "--target-flops", help="Mean FLOPs fraction of the full model to meet."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Blocks before which tokens are dropped (default 4,7,10 for 12 blocks)."),
    epochs: int = typer.Option(30, "--epochs", help="Passes over the calibration inputs."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N calibration inputs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the input order (and of the noise inputs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
):
    """Learn AS-ViT's thresholds for a FLOPs budget on CPU: the backbone stays frozen, the thresholds
    learn by distillation from the full model with soft keep masks, starting from the training-free
    calibrated ones; then the hard budget is met exactly. The paper trains backbone and thresholds
    together (30 epochs on ImageNet); this tunes the thresholds alone."""
    with _user_errors():
        from .converter.tune import tune_asvit_thresholds

        parsed = _int_list(stages, "--stages takes comma-separated block indices such as 4,7,10") if stages else None
        with _progress("tuning AS-ViT thresholds") as report:
            result = tune_asvit_thresholds(model, out_file, str(calib) if calib else None, target_flops, parsed,
                                           epochs, seed, limit, overwrite, progress=report)
        print_table(out, thresholds_table(result, target_flops))
        if result["kept_start"]:
            out.print("note: the tuned thresholds agreed less with the full model than the calibrated ones; "
                      "the calibrated ones were written.", style="yellow")
        out.print(f"wrote {out_file}; use it with: vit2trt convert {model} --method asvit --thresholds {out_file}")


def thresholds_table(result: dict, target_flops: float) -> Table:
    """The calibrated and the tuned thresholds side by side, one row per stage: any number of stages fits."""
    table = Table(title=f"AS-ViT thresholds for {target_flops:g} of the FLOPs, {result['inputs']}",
                  box=box.SIMPLE_HEAD)
    table.add_column("")
    for column in ("calibrated (start)", "tuned"):
        table.add_column(column, justify="right", no_wrap=True)
    start = result["start"]
    for stage, calibrated, tuned in zip(result["stages"], start["thresholds"], result["thresholds"]):
        table.add_row(f"θ at stage {stage}", f"{calibrated:.3g}", f"{tuned:.3g}")
    table.add_row("FLOPs fraction", f"{start['flops_fraction']:.3f}", f"{result['flops_fraction']:.3f}")
    table.add_row("top-1 agreement with the full model", f"{start['top1_agreement'] * 100:.1f}%",
                  f"{result['top1_agreement'] * 100:.1f}%")
    return table


@app.command()
def validate(
    out_dir: Path = typer.Argument(..., help="A folder written by `vit2trt convert --out`."),
    images: Path = typer.Option(..., "--images", help="Folder of images (flat, or an ImageFolder: one subfolder per class, which labels the images) or .npy [N,C,H,W], preprocessed as the reference record says."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class per image of a flat folder: JSON {\"file\": class} or lines 'file class' (with an .npy: an .npy of classes)."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="With an ImageFolder: JSON list of folder names (position = class index) or {\"folder\": index}, when the head's class order is not the folders' sorted order."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The original as a PyTorch model, timm:NAME or hf:ViTForImageClassification (built as `vit2trt export` builds it; with --weights and --arg), a reference record FILE.reference.json, or the original ORIGINAL.onnx (a PyTorch ViT assembled from that graph). Default: OUT/reference.json, copied by convert when `vit2trt export` wrote the original; else the original graph convert read, if it is still there."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --reference timm:/hf:: the checkpoint, .safetensors or .pth/.pt (read without unpickling code)."),
    arg: List[str] = typer.Option([], "--arg", help="With --reference timm:/hf:: constructor argument KEY=VALUE, repeatable (e.g. --arg num_classes=200)."),
    reference_onnx: Optional[Path] = typer.Option(None, "--reference-onnx", help="Compare with the original graph in ONNX Runtime instead, when no PyTorch model is at hand (the surgery check against PyTorch is then skipped)."),
    batch: int = typer.Option(8, "--batch", help="Batch size of the batched runs."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N images."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Fail (exit 1) below this top-1 agreement with the reference, e.g. 0.99."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Fail (exit 1) when any image's logits cosine similarity is below this."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Fail (exit 1) when top-1 accuracy drops by more than this fraction (needs labels: --labels or an ImageFolder)."),
):
    """Check a compressed graph against the reference of the original model (its PyTorch model, or
    the original graph with --reference-onnx): top-1 agreement, logits cosine, max abs error,
    accuracy with labels (--labels, or the class subfolders of an ImageFolder), batch independence.
    The result is added to OUT/report.json; exit code 1 when a threshold is missed."""
    with _user_errors():
        from .converter.measure.validate import Thresholds, validate as run_validate

        with _progress("validating") as report:
            result = run_validate(out_dir, images, labels, reference, batch, limit,
                                  Thresholds(min_agreement, min_cosine, max_accuracy_drop), progress=report,
                                  class_map=class_map, weights=weights, model_args=_parse_model_args(arg),
                                  reference_onnx=reference_onnx)
        out.print(f"reference: {escape(result['reference'])}")
        if result.get("reference_note"):
            err.print(f"[yellow]note:[/] {escape(result['reference_note'])}")
        print_table(out, validate_table(result, out_dir))
        engine = result["engine"]
        if isinstance(engine, dict):
            out.print(f"engine: top-1 agreement {engine['top1_agreement'] * 100:.1f}%, "
                      f"max abs error {engine['max_abs_error']:.3g}")
        else:
            out.print(f"engine: {engine}")
        for failure in result["failures"]:
            err.print(f"[bold red]failed:[/] {escape(failure)}")
        if result["failures"]:
            raise typer.Exit(1)


def validate_table(result: dict, out_dir: Path) -> Table:
    table = Table(title=f"{out_dir}/model.onnx vs the reference, {result['images']} images",
                  box=box.SIMPLE_HEAD)
    table.add_column("check")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_row("top-1 agreement", f"{result['top1_agreement'] * 100:.1f}%")
    table.add_row("logits cosine (mean / min)", f"{result['cosine_mean']:.5f} / {result['cosine_min']:.5f}")
    table.add_row("max abs error (relative)", f"{result['max_abs_error']:.3g} ({result['relative_error']:.2g})")
    table.add_row("batch vs single runs, max diff", f"{result['batch_dependence']:.2g}")
    if result["surgery_error"] is not None:
        table.add_row("graph vs PyTorch compressed the same way", f"{result['surgery_error']:.2g} (relative)")
    if result.get("surgery_near_ties"):
        table.add_row("ToMe near-ties rounding decided (followed)", str(result["surgery_near_ties"]))
    if "accuracy" in result:
        a = result["accuracy"]
        table.add_row("top-1 accuracy reference / compressed",
                      f"{a['reference_top1'] * 100:.1f}% / {a['compressed_top1'] * 100:.1f}%")
        table.add_row("top-5 accuracy reference / compressed",
                      f"{a['reference_top5'] * 100:.1f}% / {a['compressed_top5'] * 100:.1f}%")
    return table


@app.command()
def bench(
    out_dir: Path = typer.Argument(..., help="A folder written by `vit2trt convert --out`."),
    original: Optional[Path] = typer.Option(None, "--original", help="The uncompressed graph (default: the one convert read)."),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, comma-separated (default: 1 and the engine profile's opt batch, else 1,8)."),
    repeats: int = typer.Option(20, "--repeats", help="Paired timing rounds per batch size at least; up to 8x as many while the speedup's 95% interval is wider than ±5% (at most --time-cap), else it is marked unstable."),
    time_cap: float = typer.Option(30.0, "--time-cap", help="Seconds of timing at most per backend and batch size."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    backend: List[str] = typer.Option(["ort"], "--backend", help="ort (ONNX Runtime CPU), tensorrt (the engines, on a GPU), torch-cuda (PyTorch references with CUDA graphs) or torch-cpu; repeatable."),
):
    """Time the original and the compressed model side by side in back-to-back pairs (median and p90
    latency; speedup as the median of the pairs' ratios with its 95% interval, marked unstable or
    beyond the FLOPs ratio where it is). Results go into OUT/report.json."""
    with _user_errors():
        from .converter.measure.bench import bench as run_bench
        from .converter.measure.speedup import terminal_legend

        batches = None if batch is None else _int_list(batch, "--batch takes comma-separated sizes such as 1,8")
        with _progress("timing") as report:
            result = run_bench(out_dir, original, batches, repeats, threads, tuple(backend), progress=report,
                               time_cap=time_cap)
        for table in bench_tables(result, threads):
            print_table(out, table)
        out.print("speedup = median of the paired ratios original / compressed [95% interval]; "
                  + terminal_legend())


def bench_tables(result: dict, threads: int) -> list[Table]:
    """One table per backend; what the speedup is goes in the legend under them (as a title it would wrap)."""
    from .converter.planning.report import speedup_cell

    tables = []
    for name, rows in result["backends"].items():
        table = Table(title=f"{name}, {threads} threads", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("variant", "batch", "median ms", "p90 ms", "speedup"):
            table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
        for row in rows:
            table.add_row(row["variant"], str(row["batch"]), f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}",
                          speedup_cell(row, result.get("flops_ratio"), ascii=True))
        tables.append(table)
    return tables


@app.command()
def heal(
    out_dir: Path = typer.Argument(..., help="A folder written by `vit2trt convert --out` (or `plan`)."),
    images: Path = typer.Option(..., "--images", help="Folder of images to heal on, flat or an ImageFolder (one subfolder per class). No labels needed: the original teaches; --labels or --class-map add them."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class per image of a flat --images folder (as for validate): adds the label loss."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="With an ImageFolder as --images: heal with its folders as labels, JSON list of folder names (position = class index) or {\"folder\": index}. Without it an ImageFolder heals without labels."),
    time_limit: float = typer.Option(900.0, "--time-limit", help="Seconds for the whole heal; without --epochs, training takes what fits. The best state so far is written when it runs out (and on Ctrl-C)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training images (default: as many as fit in --time-limit). With --epochs and the same --seed, a CPU run gives the same bytes."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA where PyTorch sees it), cpu or cuda."),
    batch: int = typer.Option(64, "--batch", help="Images per training step."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (warm-up, then cosine decay)."),
    holdout: float = typer.Option(0.1, "--holdout", help="Fraction of --images never trained on: the judge that keeps the best state."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the batches and the augmentation."),
    recipe: str = typer.Option("features", "--recipe", help="What the compressed model learns to mimic: logits (the class distribution), features (that and the pooled feature; the default, docs/methods/heal.md), blocks (that and every block's output while tokens correspond)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Read only N of --images (an ImageFolder: spread over its classes)."),
    heal_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the healed folder here (default: OUT itself, replaced atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    val: Optional[Path] = typer.Option(None, "--val", help="Labelled images to validate the healed model on at the end (as validate's --images); never trained on."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Labels of a flat --val folder (as validate's --labels)."),
    val_class_map: Optional[Path] = typer.Option(None, "--val-class-map", help="Class map of an ImageFolder --val (as validate's --class-map)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The original as a PyTorch model, timm:NAME or hf:ViTForImageClassification (with --weights and --arg), a reference record FILE, or the original ORIGINAL.onnx (a PyTorch ViT assembled from that graph). Default: OUT/reference.json, else the original graph convert read."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --reference timm:/hf:: the checkpoint, .safetensors or .pth/.pt (read without unpickling code)."),
    arg: List[str] = typer.Option([], "--arg", help="With --reference timm:/hf:: constructor argument KEY=VALUE, repeatable."),
):
    """Win back accuracy: distil the original into the compressed model on your images (no labels needed),
    judged on a held-out part of them, and write the trained weights back into the same graph (same nodes
    and shapes, proven equal to the healed PyTorch model). Adds healed.safetensors and a 'heal' section to
    decisions.json and report.json; rebuilds the engine if OUT had one."""
    with _user_errors():
        from .converter.healing.heal import HealOptions, heal as run_heal

        from .converter.healing.parallel import launched_rank

        options = HealOptions(images, labels, class_map, time_limit, epochs, device, batch, lr, holdout, seed,
                              recipe, limit, heal_out, overwrite, reference, str(weights) if weights else None,
                              _parse_model_args(arg), val, val_labels, val_class_map)
        if launched_rank() != 0:   # under torchrun: rank 0 reports and writes
            run_heal(out_dir, options)
            return
        with _progress("healing") as report:
            section = run_heal(out_dir, options, progress=report)
        print_table(out, heal_table(section, heal_out or out_dir))
        if section["stopped_by"] != "schedule":
            err.print(f"[yellow]note:[/] training stopped early ({section['stopped_by']}); the best state was written.")


def heal_table(section: dict, folder: Path) -> Table:
    table = Table(title=f"healed {folder}/model.onnx", box=box.SIMPLE_HEAD)
    table.add_column("held-out images", no_wrap=True)
    table.add_column("before", justify="right", no_wrap=True)
    table.add_column("after", justify="right", no_wrap=True)
    before, after = section["holdout_before"], section["holdout_after"]
    table.add_row("KL to the original", f"{before['kl']:.4f}", f"{after['kl']:.4f}")
    table.add_row("top-1 agreement", f"{before['agreement'] * 100:.1f}%", f"{after['agreement'] * 100:.1f}%")
    if "top1" in before:
        table.add_row("top-1 accuracy", f"{before['top1'] * 100:.1f}%", f"{after['top1'] * 100:.1f}%")
    if "ce" in before:   # with labels the best state is chosen by KL + cross-entropy
        table.add_row("cross-entropy with the labels", f"{before['ce']:.4f}", f"{after['ce']:.4f}")
    accuracy = (section.get("validation") or {}).get("accuracy")
    if accuracy:
        table.add_row("--val top-1: original / healed", f"{accuracy['reference_top1'] * 100:.1f}%",
                      f"{accuracy['compressed_top1'] * 100:.1f}%")
    table.caption = (f"{section['images']} images, {section['epochs']:g} epochs, {section['seconds']:.0f} s on "
                     f"{section['device']} ({section['images_per_second']:.0f} img/s); graph = PyTorch within "
                     f"{section['check']['relative_error']:.1g}")
    return table


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("vit2trt-demo"), "--out", "-o", help="Output folder: demo.md, demo.json, demo.png and one convert folder per method."),
    repeats: int = typer.Option(30, "--repeats", help="Paired timing rounds per speedup at least; up to 8x as many while its 95% interval is wider than ±5% (at most --time-cap), else it is marked unstable."),
    time_cap: float = typer.Option(3.0, "--time-cap", help="Seconds of timing at most per speedup (method and batch size)."),
    heal_epochs: int = typer.Option(3, "--heal-epochs", help="Passes over the training canvases for the healed row (cait_healed)."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    build: bool = typer.Option(True, "--build/--no-build", help="Build TensorRT engines where a TensorRT module is present."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """Every method on the bundled, really trained digits ViT: convert with toast, asvit, cait and
    tome, heal the cait result on the training canvases, validate each on the fixed test split
    (accuracy), time all of them side by side, and print one table (also demo.md with a plot)."""
    with _user_errors():
        from .converter.demo import run_demo
        from .converter.measure.speedup import terminal_legend

        with _progress("demo") as report:
            summary = run_demo(out_dir, repeats, threads, build, overwrite, progress=report, time_cap=time_cap,
                               heal_epochs=heal_epochs)
        print_table(out, demo_table(summary, threads))
        out.print(terminal_legend())
        engines = sorted({row.get("engine") or "not built" for name, row in summary["rows"].items()
                          if name != "uncompressed"})
        out.print(f"TensorRT engines: {', '.join(engines)}")
        out.print(f"wrote {out_dir}/demo.md, demo.json, demo.png and {', '.join(r for r in summary['rows'] if r != 'uncompressed')}/ "
                  "(each with report.html)")


def demo_table(summary: dict, threads: int) -> Table:
    """One row per method; the settings of each are in demo.md."""
    from .converter.demo import figure
    from .converter.measure.speedup import format_speedup

    table = Table(title=f"bundled digits ViT: accuracy on {summary['test_images']} test images; speedup (b1, b8) "
                        f"in ONNX Runtime CPU, {threads} threads, median of paired ratios [95% interval]",
                  box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    # Six columns, one space apart, fit an 80-column terminal with both intervals whole even at 10x and more
    # (GFLOPs are in demo.md).
    for column in ("method", "FLOPs×", "speedup b1", "speedup b8", "acc.", "Δ acc."):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for name, row in summary["rows"].items():
        table.add_row(name, f"{row.get('flops_ratio', 1.0):.2f}",
                      format_speedup(figure(row, 1), ascii=True), format_speedup(figure(row, 8), ascii=True),
                      f"{row['accuracy'] * 100:.1f}%", f"{row['accuracy_delta'] * 100:+.1f}")
    return table


@contextmanager
def _progress(first: str):
    """A progress line on stderr: a bar while the step says 'k/n', a spinner otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(first, total=None)

        def report(message: str) -> None:
            counted = re.match(r"(.*?)[ :]*(\d+)/(\d+)\s*$", message)
            if counted:
                progress.update(task, description=counted.group(1), completed=int(counted.group(2)),
                                total=int(counted.group(3)))
            else:
                progress.update(task, description=message, completed=0, total=None)

        yield report


def _int_list(text: str, usage: str) -> list[int]:
    """Comma-separated integers, or an error that says what the option takes."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise Vit2TrtError(f"{usage}, not '{text}'.") from None


def _batch_profile(text: str) -> tuple[int, int, int]:
    values = _int_list(text, "--batch takes min,opt,max such as 1,1,8")
    if len(values) != 3:
        raise Vit2TrtError(f"--batch takes min,opt,max such as 1,1,8, not '{text}'.")
    return tuple(values)


def _print_description(g) -> None:
    for table in description_tables(g):
        print_table(out, table)
    out.print("columns: tokens = tokens the attention sees, qkv = fused/split projections, FFN = hidden units "
              "(* = Token Channel Selection), LS = layer scale, proj/attn/FFN = projection, attention-matmul and "
              "FFN GFLOPs", style="dim")
    f = g.flops
    out.print(f"GFLOPs (multiply-accumulates, batch 1): total {f.total / 1e9:.3f} = patch embed "
              f"{f.patch_embed / 1e9:.3f} + blocks {f.blocks / 1e9:.3f} + head {f.head / 1e9:.4f}"
              + (f" + other {f.other / 1e9:.3f}" if f.other else ""))
    if g.build is not None:
        b = g.build
        if b.status == "built":
            out.print(f"TensorRT ({b.backend}): parsed and built in {b.seconds:.1f} s, {b.message}")
        elif b.status == "unavailable":
            out.print(f"TensorRT: not checked, {b.message}")
        else:
            out.print(f"[bold red]TensorRT ({b.backend}): {b.status}[/]: {b.message}", highlight=False)


def description_tables(g) -> list[Table]:
    """The model's summary, and its blocks under short column names (explained under them)."""
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", f"{g.path}  (opset {g.opset})")
    summary.add_row("input", f"{g.input_name} [N, {g.in_chans}, {g.img_size[0]}, {g.img_size[1]}]")
    summary.add_row("patches", f"{g.patch_size[0]}x{g.patch_size[1]} -> {g.patch_embed.grid[0]}x{g.patch_embed.grid[1]} = "
                    f"{g.num_patches} tokens, embed dim {g.embed_dim}")
    extra = ", ".join(f"{t.kind} x{t.count} ({t.tensor})" for t in g.extra_tokens) or "none"
    summary.add_row("extra tokens", f"{g.num_extra_tokens}: {extra}")
    summary.add_row("position embed", f"{g.pos_embed or 'none'}"
                    + (" (covers extra tokens)" if g.pos_embed and g.pos_embed_covers_extra_tokens else ""))
    pool = f"class token {g.head.token_index}" if g.pooling == "token" else "mean over patch tokens"
    summary.add_row("pooling", pool + (f", fc_norm {g.head.fc_norm}" if g.head.fc_norm else ""))
    summary.add_row("final norm", g.head.final_norm or "none")
    forms = {"explicit": "MatMul → Softmax → MatMul", "sdpa_nan_guard": "MatMul → Softmax → IsNaN/Where guard → MatMul",
             "onnx_attention": "ONNX Attention op (fused; kept where a pass does not change attention)"}
    used = sorted({b.attn.form for b in g.blocks})
    summary.add_row("attention", "; ".join(f"{forms[f]} ({sum(b.attn.form == f for b in g.blocks)} blocks)"
                                           for f in used))
    heads = " + ".join(l.node for l in g.head.linears) or "none"
    summary.add_row("head", f"{g.head.num_classes} classes ({heads})")

    table = Table(title=f"{g.depth} blocks (GFLOPs at batch 1)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False)
    for col in ("#", "tokens", "qkv", "heads", "dim qk/v", "FFN", "act", "LS", "proj", "attn", "FFN", "block"):
        table.add_column(col, justify="left" if col in ("qkv", "act") else "right", no_wrap=True)
    for b in g.blocks:
        a = b.attn
        ffn = str(b.ffn.hidden)
        selected = [str(lin.selected_in) for lin in (b.ffn.fc1, b.ffn.fc2) if lin.selected_in]
        table.add_row(
            str(b.index), str(b.tokens), a.layout.split("_")[0], str(a.heads), f"{a.head_dim_qk}/{a.head_dim_v}",
            ffn + ("*" if selected else ""), b.ffn.activation,
            "yes" if b.layer_scale_attn else "no", f"{b.flops.attn_proj / 1e9:.3f}",
            f"{b.flops.attn_matmul / 1e9:.3f}", f"{b.flops.ffn / 1e9:.3f}", f"{b.flops.total / 1e9:.3f}")
    return [summary, table]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    app(prog_name="vit2trt")


if __name__ == "__main__":
    main()
