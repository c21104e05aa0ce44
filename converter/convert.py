"""`vit2trt convert`: run the passes of a method, check the result, write OUT atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx

from vit2trt.converter.engine import BuildOptions, build_engine, check_build, report_dict
from vit2trt.converter.graph_reader import describe_vit
from vit2trt.converter.loading import load_onnx
from vit2trt.converter.report import block_table, flops_breakdown, render_report
from vit2trt.converter.shapes import memory_session
from vit2trt.converter.vit_graph import BuildReport
from vit2trt.errors import Vit2TrtError
from vit2trt.passes.scwp import scwp_keep
from vit2trt.passes.strip_zeros import strip_dead_structure
from vit2trt.passes.structured_prune import BlockKeep, prune_structure
from vit2trt.passes.tcs import apply_tcs, tcs_blocks
from vit2trt.passes.toast_plan import ToastPlan, plan_toast
from vit2trt.passes.tome import apply_tome

METHODS = ("toast", "tome", "asvit", "cait")
COMPENSATION_FILE = "compensation.safetensors"
_TWO_GB = 2**31


@dataclass
class ConvertOptions:
    method: str = "toast"
    head_sparsity: Optional[float] = None
    target_gflops: Optional[float] = None
    fc1_ratios: Optional[list[float]] = None
    fc2_ratios: Optional[list[float]] = None
    tcs_shared: bool = False
    tome_r: int = 13                        # ToMe: tokens merged per block
    asvit_thresholds: Optional[list[float]] = None   # AS-ViT: θ per stage (else calibrated)
    stages: Optional[list[int]] = None               # AS-ViT / CAIT: blocks before which tokens drop / merge
    target_flops: Optional[float] = None             # FLOPs fraction: AS-ViT calibrates for it (default 0.65);
                                                     # toast and cait allocate pruning by sensitivity for it
    multiple: int = 1                                # toast / cait: kept head dims and FFN channels are multiples
    compensate: Optional[bool] = None                # closed-form compensation (default: on with --calib)
    fit_limit: int = 512                             # calibration images the compensation fits on
    asvit_form: str = "packed"
    channel_ratio: Optional[float] = None            # CAIT: attention channels removed per head (default 0.25)
    restore_grid: bool = False                       # CAIT: also output the final tokens on the full grid
    model_name: Optional[str] = None        # timm name, to pick a published schedule
    calib: Optional[str] = None             # images or .npy for the agreement check
    calib_limit: int = 64
    skip_blocks: tuple[int, ...] = (0,)
    build: bool = True
    engine: str = "auto"                    # auto, tensorrt, tensorrt-rtx or none
    batch: tuple[int, int, int] = (1, 1, 8)  # engine optimization profile: min, opt, max batch
    precision: str = "fp32"                 # engine precision: fp32, fp16, bf16
    check_batch: int = 8
    seed: int = 0
    overwrite: bool = False


@dataclass
class ConvertResult:
    out_dir: Path
    onnx_path: Path
    decisions: dict
    flops_before: int
    flops_after: int
    agreement: dict
    build: Optional[BuildReport]
    notes: list[str] = field(default_factory=list)


def compose_keeps(first: list[BlockKeep], second: list[BlockKeep]) -> list[BlockKeep]:
    """Express `second` (indices into what `first` kept) in indices of the original model."""
    by_index = {k.index: k for k in first}
    out = {k.index: BlockKeep(k.index, k.qk_keep, k.v_keep, k.ffn_keep) for k in first}
    for k in second:
        base = by_index.get(k.index)
        merged = out.setdefault(k.index, BlockKeep(k.index))
        for attr in ("qk_keep", "v_keep"):
            new = getattr(k, attr)
            if new is None:
                continue
            old = getattr(base, attr) if base else None
            setattr(merged, attr, [[old[h][j] for j in dims] if old else list(dims) for h, dims in enumerate(new)])
        if k.ffn_keep is not None:
            old = base.ffn_keep if base else None
            merged.ffn_keep = [old[c] for c in k.ffn_keep] if old else list(k.ffn_keep)
    return [out[i] for i in sorted(out)]


def convert(model_path: str | os.PathLike, out_dir: str | os.PathLike, options: ConvertOptions,
            progress: Callable[[str], None] = lambda msg: None) -> ConvertResult:
    if options.method not in METHODS:
        raise Vit2TrtError(f"unknown method '{options.method}'; available: {', '.join(METHODS)}.")
    if options.method != "toast" and (options.head_sparsity is not None or options.target_gflops is not None
                                      or options.fc1_ratios is not None or options.fc2_ratios is not None):
        raise Vit2TrtError("--head-sparsity, --target-gflops, --fc1 and --fc2 belong to --method toast.")
    if options.method != "cait" and (options.channel_ratio is not None or options.restore_grid):
        raise Vit2TrtError("--channel-ratio and --restore-grid belong to --method cait.")
    if options.method not in ("asvit", "cait") and options.stages is not None:
        raise Vit2TrtError("--stages belongs to --method asvit or cait.")
    if options.method == "tome" and options.target_flops is not None:
        raise Vit2TrtError("--target-flops belongs to --method toast, cait or asvit; ToMe's budget is --r.")
    if options.method not in ("toast", "cait") and (options.multiple != 1 or options.compensate is not None):
        raise Vit2TrtError("--multiple and --compensate/--no-compensate belong to the structured methods, "
                           "--method toast or cait.")
    if options.method == "toast" and options.target_flops is not None and (
            options.fc1_ratios is not None or options.fc2_ratios is not None):
        raise Vit2TrtError("--target-flops prunes FFN channels statically and counts no TCS; give it without "
                           "--fc1/--fc2 (or use --target-gflops for ToaSt's schedules with TCS).")
    if options.compensate and not options.calib:
        raise Vit2TrtError("compensation fits on calibration images: give --calib DIR (or drop --compensate).")
    if options.method == "toast" and options.target_flops is not None and (
            options.head_sparsity is not None or options.target_gflops is not None):
        raise Vit2TrtError("--target-flops chooses every block's dims itself; give it without --head-sparsity and "
                           "--target-gflops (ToaSt's published schedules).")
    if options.method == "cait" and options.target_flops is not None and options.channel_ratio is not None:
        raise Vit2TrtError("--target-flops chooses every block's channels itself; give it without --channel-ratio.")
    if options.target_flops is not None and not 0.0 < options.target_flops <= 1.0:
        raise Vit2TrtError(f"--target-flops is a fraction of the original model's FLOPs in (0, 1], "
                           f"got {options.target_flops}.")
    if options.fit_limit < 1:
        raise Vit2TrtError(f"--fit-images must be at least 1, got {options.fit_limit}.")
    if options.target_flops is not None and options.method in ("toast", "cait") and not options.calib:
        raise Vit2TrtError(f"--target-flops for --method {options.method} measures each block's sensitivity on "
                           "calibration images: give --calib DIR.")
    build_options = BuildOptions(options.engine if options.build else "none", tuple(options.batch), options.precision)
    check_build(build_options)   # a module asked for but missing, or a precision it cannot build: before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not options.overwrite:
        raise Vit2TrtError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    progress("reading the graph")
    original = load_onnx(model_path)
    vit = describe_vit(original, str(model_path))
    if options.method in ("toast", "cait"):
        from vit2trt.passes.sensitivity import check_multiple

        check_multiple(vit, options.multiple)
    run = {"toast": _run_toast, "tome": _run_tome, "asvit": _run_asvit, "cait": _run_cait}[options.method]
    model, current, sections, notes = run(original, vit, options, model_path, progress)
    compensation = sections.pop("compensation_weights", None)
    if compensation:   # the fitted weights, which the PyTorch reference sets after pruning the same way
        sections["compensation"] = {"file": COMPENSATION_FILE, "tensors": sorted(compensation)}

    progress("checking against the original graph")
    if options.calib:
        from vit2trt.converter.calibration import load_calibration

        record = _record(model_path)
        inputs = load_calibration(options.calib, (vit.in_chans, *vit.img_size),
                                  (record or {}).get("preprocessing"), options.calib_limit,
                                  progress=lambda done, total: progress(f"reading calibration images {done}/{total}"))
        described = f"{len(inputs)} calibration inputs from {Path(options.calib).name}"
    else:
        inputs = np.random.default_rng(options.seed).standard_normal(
            (options.check_batch, vit.in_chans, *vit.img_size)).astype(np.float32)
        described = f"{options.check_batch} seeded random images"
    agreement = _agreement(original, model, inputs, described)
    decisions = {"method": options.method, "source": Path(model_path).name, **sections,
                 "flops": {"before": vit.flops.total, "after": current.flops.total}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = None
    # Stage everything beside OUT, then move it into place: nothing half-written on failure.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".vit2trt-convert-") as staging:
        tmp = Path(staging) / "out"
        tmp.mkdir()
        onnx_path = tmp / "model.onnx"
        if model.ByteSize() >= _TWO_GB:
            onnx.save(model, str(onnx_path), save_as_external_data=True, location="model.onnx.data")
        else:
            onnx.save(model, str(onnx_path))
        if compensation:
            from safetensors.numpy import save_file

            save_file(compensation, str(tmp / COMPENSATION_FILE))
        (tmp / "decisions.json").write_text(json.dumps(decisions, indent=1, sort_keys=True) + "\n")
        record_path = Path(str(model_path) + ".reference.json")
        if record_path.is_file():   # lets `vit2trt validate OUT` rebuild the PyTorch reference
            shutil.copyfile(record_path, tmp / "reference.json")
        if build_options.engine != "none":
            progress("building a TensorRT engine")
            # A failed build keeps everything else: the ONNX is the result, the report says what failed.
            build = build_engine(onnx_path, engine_path=tmp / "model.engine", options=build_options)
            if build.status == "unavailable":
                notes.append(build.message)
        (tmp / "report.json").write_text(json.dumps(
            {"agreement": agreement, "flops": decisions["flops"], "notes": notes, "method": options.method,
             "source_path": str(Path(model_path).resolve()),
             "blocks": block_table(vit, current), "flops_breakdown": flops_breakdown(vit, current),
             "build": report_dict(build)}, indent=1, sort_keys=True) + "\n")
        render_report(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return ConvertResult(out_dir, out_dir / "model.onnx", decisions, vit.flops.total, current.flops.total,
                         agreement, build, notes)


def _strip_zeroed(model, vit, progress):
    """Remove structure a masked fine-tune zeroed: (model, description, pass report, keeps)."""
    progress("stripping zeroed structure")
    result, keeps = strip_dead_structure(model, vit)
    if not keeps:
        return model, vit, result.report, []
    return result.model, describe_vit(result.model, "stripped graph"), result.report, keeps


def _run_toast(model, vit, options: ConvertOptions, model_path, progress):
    model, current, stripped, keeps = _strip_zeroed(model, vit, progress)
    passes, notes = [stripped], []
    budget, compensation, stats = None, {}, None
    if options.target_flops is not None:
        from vit2trt.passes.sensitivity import plan_budget

        plan = ToastPlan(None, None, None)   # the budget replaces SCWP and TCS

        stats = _calibration_stats(model, current, options, model_path, progress)
        new_keeps, budget = plan_budget(model, current, stats, options.target_flops * vit.flops.total,
                                        options.multiple, progress=progress)
        model, current, keeps = _prune_compensated(model, current, keeps, new_keeps, stats, options, passes,
                                                   compensation, "sensitivity budget", progress)
        notes.append(f"dims and channels allocated by measured sensitivity for {options.target_flops:g} of the "
                     f"original FLOPs on {stats.images} calibration images, without training.")
    else:
        plan = plan_toast(current, options.head_sparsity, options.fc1_ratios, options.fc2_ratios,
                          options.target_gflops, options.model_name or _recorded_name(model_path))
        notes.extend(plan.notes)
    if plan.head_sparsity:
        progress(f"SCWP at head sparsity {plan.head_sparsity:g}")
        scwp_keeps = scwp_keep(model, current, plan.head_sparsity, options.skip_blocks, options.multiple)
        if scwp_keeps:
            if options.compensate is not False:
                stats = _calibration_stats(model, current, options, model_path, progress)
            model, current, keeps = _prune_compensated(model, current, keeps, scwp_keeps, stats, options, passes,
                                                       compensation, "scwp", progress)
            passes[-1].update({"head_sparsity": plan.head_sparsity, "skipped_blocks": list(options.skip_blocks)})
            notes.append("SCWP pruned weights without fine-tuning: ToaSt fine-tunes afterwards (about 300 epochs "
                         "for DeiT) to recover accuracy" + (", and closed-form compensation repaired what it could"
                                                            if stats else "") + ".")
    tcs_record = None
    if plan.fc1_ratios is not None:
        progress("inserting Token Channel Selection")
        blocks = tcs_blocks(current, plan.fc1_ratios, plan.fc2_ratios)
        if blocks:
            result = apply_tcs(model, current, blocks, shared=options.tcs_shared)
            passes.append(result.report)
            model = result.model
            current = describe_vit(model, "graph with TCS")
            tcs_record = {"blocks": result.report["blocks"], "settings": result.report["settings"],
                          "fc1_ratios": plan.fc1_ratios, "fc2_ratios": plan.fc2_ratios}
    if not keeps and tcs_record is None:
        notes.append("nothing was compressed: no zeroed structure was found and no --head-sparsity, --target-flops, "
                     "--target-gflops or TCS ratios were given.")
    notes.extend(_fusion_notes(current))
    sections = {
        "settings": {"head_sparsity": plan.head_sparsity, "skip_blocks": list(options.skip_blocks),
                     "target_gflops": options.target_gflops, "schedule": plan.schedule,
                     "tcs_shared": options.tcs_shared, "target_flops": options.target_flops,
                     "multiple": options.multiple},
        "passes": passes, "blocks": [k.to_dict() for k in keeps], "tcs": tcs_record, "budget": budget,
    }
    sections["compensation_weights"] = compensation
    return model, current, sections, notes


def _calibration_stats(model, vit, options: ConvertOptions, model_path, progress):
    """Activation moments for compensation and budgets, when calibration images are given."""
    if not options.calib:
        return None
    from vit2trt.converter.calibration import load_calibration
    from vit2trt.passes.calibration_stats import collect_stats

    inputs = load_calibration(options.calib, (vit.in_chans, *vit.img_size),
                              (_record(model_path) or {}).get("preprocessing"), options.fit_limit,
                              progress=lambda done, total: progress(f"reading calibration images {done}/{total}"))
    return collect_stats(model, vit, inputs,
                         progress=lambda done, total: progress(f"calibration statistics {done}/{total} images"))


def _prune_compensated(model, current, keeps, new_keeps, stats, options, passes, compensation, name, progress):
    """Remove what `new_keeps` drops, with compensation when statistics are at hand."""
    if stats is not None and options.compensate is not False:
        from vit2trt.passes.sensitivity import compensate_keeps

        progress("fitting compensation")
        fitted, tensors = compensate_keeps(model, current, stats, new_keeps)
        passes.append(fitted.report)
        model = fitted.model
        current = describe_vit(model, "compensated graph")   # the fitted weights are new constants
        compensation.update(tensors)
    result = prune_structure(model, current, new_keeps)
    result.report["pass"] = name
    passes.append(result.report)
    model = result.model
    return model, describe_vit(model, f"graph after {name}"), compose_keeps(keeps, new_keeps)


def _run_tome(model, vit, options: ConvertOptions, model_path, progress):
    progress(f"merging {options.tome_r} tokens per block (ToMe)")
    result = apply_tome(model, vit, options.tome_r)
    current = describe_vit(result.model, "graph with ToMe")
    notes = [f"ToMe merges {sum(result.report['r'])} of {vit.num_tokens} tokens over {vit.depth} blocks "
             f"({result.report['tokens'][-1]} leave the last block); training-free, as the paper."]
    return result.model, current, {"settings": {"r": options.tome_r}, "passes": [result.report],
                                   "tome": result.report}, notes


def _run_asvit(model, vit, options: ConvertOptions, model_path, progress):
    from vit2trt.passes.asvit import apply_asvit, check_settings, default_stages

    stages = options.stages or default_stages(vit.depth)
    notes, calibration = [], None
    thresholds = options.asvit_thresholds
    if thresholds is None:
        check_settings(vit, stages, [0.0] * len(stages), options.asvit_form)
        options.target_flops = 0.65 if options.target_flops is None else options.target_flops
        thresholds, calibration = _calibrate_asvit(vit, stages, options, model_path, progress)
        if calibration["flops_fraction"] > options.target_flops + 1e-6:
            raise Vit2TrtError(f"--target-flops {options.target_flops:g} cannot be met by dropping tokens at stages "
                               f"{stages}: even dropping every patch token there leaves "
                               f"{calibration['flops_fraction']:.3f} of the FLOPs. Raise the target or prune at "
                               "earlier stages (--stages).")
        notes.append(f"AS-ViT thresholds {[round(t, 5) for t in thresholds]} calibrated without training on "
                     f"{calibration['inputs']} for {options.target_flops:g} of the FLOPs (reached "
                     f"{calibration['flops_fraction']:.3f} on average); the paper learns them with 30 epochs of "
                     f"budget-aware fine-tuning.")
    progress("inserting AS-ViT token pruning")
    result = apply_asvit(model, vit, stages, thresholds, options.asvit_form)
    current = describe_vit(result.model, "graph with AS-ViT")
    notes.append("AS-ViT keeps as many tokens as each image needs: the FLOPs above are for the reader's seeded "
                 "probe image; report.json's calibration gives the mean over the calibration inputs.")
    sections = {"settings": {"stages": stages, "thresholds": thresholds, "form": options.asvit_form,
                             "target_flops": options.target_flops},
                "passes": [result.report], "asvit": dict(result.report, calibration=calibration)}
    return result.model, current, sections, notes


def _run_cait(model, vit, options: ConvertOptions, model_path, progress):
    from vit2trt.passes.atme import apply_atme, default_stages, plan_atme
    from vit2trt.passes.cdcp import cdcp_keep

    stages = options.stages or default_stages(vit.depth)
    atme_plan = plan_atme(vit, stages)   # refuse bad stages before any work
    ratio = 0.25 if options.channel_ratio is None else options.channel_ratio
    model, current, stripped, keeps = _strip_zeroed(model, vit, progress)
    passes, notes, compensation, budget = [stripped], [], {}, None
    if keeps:
        notes.append("structure zeroed in the checkpoint (learned masks) was removed first.")
    stats = None
    if options.target_flops is not None:
        from vit2trt.passes.sensitivity import plan_budget

        ratio = None
        stats = _calibration_stats(model, current, options, model_path, progress)
        new_keeps, budget = plan_budget(model, current, stats, options.target_flops * vit.flops.total,
                                        options.multiple, consistent=True, tokens=atme_plan.tokens,
                                        progress=progress)
        name = "sensitivity budget"
        notes.append(f"channels allocated by measured sensitivity (the same channels in every head) for "
                     f"{options.target_flops:g} of the original FLOPs with ATME, without training.")
    else:
        progress(f"CDCP: removing {ratio:g} of every head's attention channels, the same in every head")
        new_keeps, name = cdcp_keep(model, current, ratio, multiple=options.multiple), "cdcp"
        if new_keeps and options.compensate is not False:
            stats = _calibration_stats(model, current, options, model_path, progress)
        notes.append("CDCP chose channels without training (weight norms); CAIT learns them in fine-tuning, "
                     "so expect an accuracy drop until the pruned model is fine-tuned"
                     + (", which closed-form compensation reduces." if stats else "."))
    if new_keeps:
        model, current, keeps = _prune_compensated(model, current, keeps, new_keeps, stats, options, passes,
                                                   compensation, name, progress)
    progress(f"ATME: merging neighbouring tokens before blocks {stages}")
    result = apply_atme(model, current, stages, restore_grid=options.restore_grid)
    passes.append(result.report)
    current = describe_vit(result.model, "graph with ATME")
    notes.extend(_fusion_notes(current))
    sections = {"settings": {"stages": stages, "channel_ratio": ratio, "restore_grid": options.restore_grid,
                             "target_flops": options.target_flops, "multiple": options.multiple},
                "passes": passes, "blocks": [k.to_dict() for k in keeps], "atme": result.report, "budget": budget,
                "compensation_weights": compensation}
    return result.model, current, sections, notes


def _fusion_notes(vit) -> list[str]:
    """TensorRT fuses attention only for head dims 16-256 that are multiples of 8 (its developer guide)."""
    bad = [f"{b.index} ({b.attn.head_dim_qk}/{b.attn.head_dim_v})" for b in vit.blocks
           if not all(16 <= d <= 256 and d % 8 == 0 for d in (b.attn.head_dim_qk, b.attn.head_dim_v))]
    if not bad:
        return []
    return [f"attention in blocks {', '.join(bad)} (QK/V head dims) cannot use TensorRT's fused attention, which "
            "needs head dims from 16 to 256 that are multiples of 8 (--multiple 8 keeps multiples of 8; a head kept at "
            "fewer than 16 dims still cannot fuse)."]


def _calibrate_asvit(vit, stages, options: ConvertOptions, model_path, progress):
    from vit2trt.models.asvit_reference import calibrate_thresholds

    model, images, described = asvit_inputs(vit, options, model_path)
    progress(f"calibrating AS-ViT thresholds on {len(images)} inputs")
    block_flops, fixed = asvit_flops_model(vit)
    thresholds, fraction = calibrate_thresholds(
        model, images, stages, block_flops, fixed, options.target_flops,
        progress=lambda step, total: progress(f"calibrating AS-ViT thresholds on {len(images)} inputs: "
                                              f"step {step}/{total}"))
    return thresholds, {"inputs": described, "flops_fraction": fraction}


def asvit_flops_model(vit) -> tuple[list[tuple], int]:
    """Per block (projections, attention matmuls, FFN) at full length, and the length-free rest."""
    block_flops = [(b.flops.attn_proj, b.flops.attn_matmul, b.flops.ffn) for b in vit.blocks]
    return block_flops, vit.flops.patch_embed + vit.flops.head + vit.flops.other


def asvit_inputs(vit, options: ConvertOptions, model_path):
    """The original's PyTorch reference and the calibration inputs: (model, images [N,C,H,W], description)."""
    import torch

    from vit2trt.models.reference import ReferenceRecord, build_model

    record_path = ReferenceRecord.path_for(model_path)
    if not record_path.is_file():
        raise Vit2TrtError(f"AS-ViT thresholds are calibrated on the PyTorch reference ({record_path.name}, written "
                           "by vit2trt export), which is missing; pass --thresholds instead.")
    record = ReferenceRecord.load(record_path)
    if options.calib:
        from vit2trt.converter.calibration import load_calibration

        images = load_calibration(options.calib, (vit.in_chans, *vit.img_size), record.preprocessing,
                                  options.calib_limit)
        described = f"{len(images)} calibration inputs"
    else:
        images = np.random.default_rng(options.seed).standard_normal(
            (16, vit.in_chans, *vit.img_size)).astype(np.float32)
        described = "16 seeded random images (pass --calib with real images for real thresholds)"
    return build_model(record), torch.from_numpy(images), described


def _record(model_path) -> Optional[dict]:
    """The reference record written by `vit2trt export` beside the model, if there is one."""
    try:
        return json.loads(Path(str(model_path) + ".reference.json").read_text())
    except (OSError, ValueError):
        return None


def _recorded_name(model_path) -> Optional[str]:
    record = _record(model_path) or {}
    return record.get("name") if record.get("family") == "timm" else None


def _agreement(original: onnx.ModelProto, compressed: onnx.ModelProto, inputs: np.ndarray, described: str) -> dict:
    """ONNX Runtime outputs of both graphs on the same inputs, in batches of 8."""
    outs = []
    for model in (original, compressed):
        session = memory_session(model)
        name = session.get_inputs()[0].name
        outs.append(np.concatenate([session.run(None, {name: inputs[i:i + 8]})[0] for i in range(0, len(inputs), 8)]))
    ref, got = outs
    diff = float(np.abs(ref - got).max())
    result = {"inputs": described, "max_abs_diff": diff,
              "relative_error": diff / max(float(np.abs(ref).max()), 1e-12)}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return result
