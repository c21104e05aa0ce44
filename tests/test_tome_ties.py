"""ToMe under exact and near ties: the graph (ONNX Runtime, whatever its settings) and the PyTorch reference
take the same merge decisions, ties go to the lower index, and the logits agree.

Ties are made, not hoped for: the model's position embedding is zeroed, so equal patches give equal
tokens, and the inputs are blank canvases, canvases of two patterns, and both again with 1e-7 noise."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file

from vit2trt.converter.artifact import Artifact
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.models.compressed_reference import compressed_reference
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.models.tome_reference import graph_decisions
from vit2trt.passes.tome import TIE_TOLERANCE, with_decision_outputs

from conftest import rel_error

ARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 48, "num_heads": 3, "depth": 4, "mlp_ratio": 2.0,
        "num_classes": 10}
R = 8
RUNTIMES = {   # ONNX Runtime settings whose kernels and fusions round differently
    "default": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 0),
    "no fusions, 1 thread": (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1),
    "basic fusions, 2 threads": (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 2),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A ToMe graph of a ViT without position embedding, and its reference."""
    root = tmp_path_factory.mktemp("ties")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **ARGS)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["pos_embed"].zero_()
    save_file(state, str(root / "no_pos.safetensors"))
    exported = export_model("timm:vit_tiny_patch16_224", root / "model.onnx", weights=str(root / "no_pos.safetensors"),
                            model_args=ARGS)
    result = convert(exported.onnx_path, root / "tome", ConvertOptions(method="tome", tome_r=R, build=False))
    reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)),
                                     json.loads((root / "tome" / "decisions.json").read_text()), root / "tome")
    result.exported = exported
    return result, reference


def tie_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blank = np.zeros((2, 3, 64, 64), np.float32)
    blank[1] += 0.7                                              # a grey canvas
    two = np.zeros((2, 3, 64, 64), np.float32)
    for image in range(2):                                       # left half one patch, right half another
        two[image, :, :, :32] = np.tile(rng.standard_normal((3, 8, 8)), (1, 8, 4))
        two[image, :, :, 32:] = np.tile(rng.standard_normal((3, 8, 8)), (1, 8, 4))
    few = np.zeros((2, 3, 64, 64), np.float32)                   # mostly blank, a small drawing
    few[:, :, 20:36, 24:40] = rng.standard_normal((2, 3, 16, 16))
    noise = lambda x: (x + 1e-7 * rng.standard_normal(x.shape)).astype(np.float32)   # noqa: E731
    return {"blank canvases": blank, "two patterns": two, "mostly blank": few,
            "blank + 1e-7": noise(blank), "two patterns + 1e-7": noise(two), "mostly blank + 1e-7": noise(few)}


def onnx_decisions(path, x: np.ndarray, rs: list[int], level, threads: int, batch: int):
    """Logits and, per merging block, (src, dst, unm) as the graph takes them."""
    model, _ = with_decision_outputs(onnx.load(str(path)))
    options = ort.SessionOptions()
    options.graph_optimization_level, options.intra_op_num_threads = level, threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(None, {session.get_inputs()[0].name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    outputs = [np.concatenate(parts) for parts in zip(*runs)]
    blocks = []
    for k, r in enumerate([r for r in rs if r]):
        blocks.append(tuple(t.numpy() for t in graph_decisions(outputs[1 + 2 * k], outputs[2 + 2 * k], r)))
    return outputs[0], blocks


def as_pairs(src, dst, unm) -> list:
    """Per image: the set of (source, destination) merges and the kept A tokens, order-free."""
    return [(sorted(zip(s.tolist(), d.tolist())), u.tolist()) for s, d, u in zip(np.asarray(src), np.asarray(dst),
                                                                                np.asarray(unm))]


@pytest.mark.parametrize("case", list(tie_inputs()))
def test_graph_and_reference_merge_alike_under_ties(tied, case):
    result, reference = tied
    x = tie_inputs()[case]
    rs = result.decisions["tome"]["r"]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    want_blocks = [as_pairs(*(t.numpy() for t in d)) for d in reference.decisions]
    assert len(want_blocks) == sum(1 for r in rs if r) >= 3
    for runtime, (level, threads) in RUNTIMES.items():
        for batch in (len(x), 1):
            got, blocks = onnx_decisions(result.onnx_path, x, rs, level, threads, batch)
            for k, (mine, theirs) in enumerate(zip(blocks, want_blocks)):
                assert as_pairs(*mine) == theirs, f"{case}, {runtime}, batch {batch}: block {k} merges differ"
            assert rel_error(got, want) <= 1e-4, f"{case}, {runtime}, batch {batch}"


def test_the_inputs_tie_and_ties_go_to_the_lower_index(tied):
    """Exact ties exist in these inputs (so the test above can fail), and a blank canvas, where every
    token ties with every other, merges A tokens 1..r (never the class token 0) into B token 0."""
    from vit2trt.models.tome_reference import best_partners

    result, reference = tied
    x = tie_inputs()["blank canvases"]
    with torch.no_grad():
        reference(torch.from_numpy(x))
    src, dst, unm = (t.numpy() for t in reference.decisions[0])
    assert (np.sort(src, 1) == np.arange(1, R + 1)).all() and (dst == 0).all()
    assert (unm[:, 0] == 0).all()   # the class token stays, first
    # On two patterns, each A token ties with half of the B tokens: many candidates within the tolerance.
    parts = reference.parts
    tokens = parts.embed(torch.from_numpy(tie_inputs()["two patterns"]))
    with torch.no_grad():
        from vit2trt.models.vit_parts import attention_parts

        _, metric, _, _ = attention_parts(parts.blocks[0], parts.blocks[0].norm1(tokens))
        best, _, scores = best_partners(metric, True)
    tied_candidates = (scores[:, 1:] >= best[:, 1:, None] - TIE_TOLERANCE).sum(-1)
    assert (tied_candidates >= 8).all()


def test_adopt_near_ties_takes_only_choices_within_the_near_tie_band():
    from vit2trt.models.tome_reference import NEAR_TIE, adopt_near_ties, split_edges

    scores = torch.tensor([[[-0.9, -0.9], [-0.10, -0.10 + NEAR_TIE / 2], [-0.30, -0.20], [-0.5, -0.9]]])
    best = scores.max(-1).values - torch.tensor([[1e4, 0, 0, 0]])       # the class token, guarded
    own = split_edges(best, torch.tensor([[0, 1, 1, 0]]), 1)             # A token 1 into B token 1, better by 5e-6
    near = (torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0, 2, 3]]))
    chosen, adopted = adopt_near_ties(best, scores, own, near, 1)
    assert adopted == 1 and chosen[1].item() == 0
    far = (torch.tensor([[2]]), torch.tensor([[1]]), torch.tensor([[0, 1, 3]]))   # A token 2 scores 0.1 lower
    chosen, adopted = adopt_near_ties(best, scores, own, far, 1)
    assert adopted == 0 and [t.tolist() for t in chosen] == [t.tolist() for t in own]
    cls = (torch.tensor([[0]]), torch.tensor([[0]]), torch.tensor([[1, 2, 3]]))   # never the class token
    assert adopt_near_ties(best, scores, own, cls, 1)[1] == 0


def test_surgery_check_follows_rounding_ties_and_still_catches_wrong_merges(tied, tmp_path, monkeypatch):
    """A graph that breaks ties by rounding (no tolerance) differs from the reference on tied inputs; the
    surgery check follows those choices and finds the surgery right. A graph that merges the wrong tokens
    (every score counted as tied) is not followed, and the check fails it."""
    import vit2trt.passes.tome as tome_pass
    from vit2trt.converter.measure.validate import surgery_check

    result, _ = tied
    record = ReferenceRecord.load(result.exported.record_path)
    x = np.concatenate(list(tie_inputs().values()))
    checks = {}
    for name, tolerance in (("rounding", 0.0), ("wrong", 10.0)):
        monkeypatch.setattr(tome_pass, "TIE_TOLERANCE", tolerance)
        out = tmp_path / name
        convert(result.exported.onnx_path, out, ConvertOptions(method="tome", tome_r=R, build=False))
        monkeypatch.undo()
        reference = compressed_reference(build_model(record), json.loads((out / "decisions.json").read_text()), out)
        with torch.no_grad():
            plain = rel_error(onnx_decisions(out / "model.onnx", x, result.decisions["tome"]["r"],
                                             ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 0, len(x))[0],
                              reference(torch.from_numpy(x)).numpy())
        checks[name] = plain, surgery_check(Artifact.open(out), record, x, 4)
    plain, followed = checks["rounding"]
    assert plain > 1e-4 and followed["error"] <= 1e-4 and followed["near_ties"] > 0
    plain, followed = checks["wrong"]
    assert plain > 1e-2 and followed["error"] > 1e-2 and followed["near_ties"] == 0


SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


@pytest.mark.skipif(not (SHARED_REAL / "vit_tiny_tin200.safetensors").is_file() or not (SHARED_REAL / "val").is_dir(),
                    reason="../shared/real (real ViT-Ti and photos) is not present (fresh clone)")
def test_real_photos_merge_as_the_official_tome_except_below_the_tie_tolerance():
    """On real photos, every merge equals the official rule's (float64, where rounding decides nothing),
    except where two of its scores lie within the tie tolerance: there vit2trt takes the lower index."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tome_official_decisions import compare, real_model, real_photos

    counts = compare(real_model(), real_photos(128), 13)
    assert counts["merges"] == 128 * 12
    assert counts["vs_float64"] <= counts["merges"] // 1000
    assert all(gap < 2 * TIE_TOLERANCE for gap in counts["gaps"])


def test_no_class_token_merging_every_a_token(tmp_path):
    """Without a class token, r is clipped to half the tokens: every A token merges (no unmerged token to
    sort) and the graph still equals the reference, through the surgery check too."""
    from vit2trt.converter.measure.validate import surgery_check

    args = dict(ARGS, class_token=False, global_pool="avg")
    exported = export_model("timm:vit_tiny_patch16_224", tmp_path / "model.onnx", model_args=args)
    result = convert(exported.onnx_path, tmp_path / "tome", ConvertOptions(method="tome", tome_r=40, build=False))
    assert result.decisions["tome"]["r"] == [32, 16, 8, 4]
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)),
                                     json.loads((tmp_path / "tome" / "decisions.json").read_text()), tmp_path / "tome")
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got, _ = onnx_decisions(result.onnx_path, x, result.decisions["tome"]["r"],
                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 0, len(x))
    assert rel_error(got, want) <= 1e-4
    checked = surgery_check(Artifact.open(tmp_path / "tome"), ReferenceRecord.load(exported.record_path), x, 2)
    assert checked["error"] <= 1e-4 and checked["near_ties"] == 0
