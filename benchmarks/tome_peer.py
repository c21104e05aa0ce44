"""vit2trt's ToMe against ToMe as a new user gets it: the model patched in PyTorch and exported by torch.onnx.

The peer here is ToMe written the way its official code merges (argsort of the edges, gathers and
`scatter_reduce(reduce="sum")`), patched into the same timm model with the same weights. It is
written for this benchmark (the official package is not installable here) and checked against
vit2trt's reference first: both must give the same logits, so the speed comparison is fair.
Each exporter's graph is then loaded in ONNX Runtime and built with TensorRT(-RTX), and whatever
loads is timed side by side with the uncompressed model and vit2trt's ToMe graph.

    python benchmarks/tome_peer.py [--model deit_small_patch16_224] [--r 13] [--repeats 15]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.engine import build_engine
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.models.tome_reference import ToMeViT
from vit2trt.models.vit_parts import attention_parts, vit_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_speedups, print_speed_table  # noqa: E402


def scatter_merge(x, size, metric, r: int, protect_cls: bool):
    """Bipartite soft matching with scatter_reduce, as ToMe's own code merges."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if protect_cls:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edges[:, r:], edges[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    if protect_cls:
        unm_idx = unm_idx.sort(dim=1).values
    y = torch.cat([x * size, size], dim=-1)
    width = y.shape[-1]
    y_a, y_b = y[:, ::2], y[:, 1::2]
    unmerged = y_a.gather(1, unm_idx.expand(-1, -1, width))
    sources = y_a.gather(1, src_idx.expand(-1, -1, width))
    y_b = y_b.scatter_reduce(1, dst_idx.expand(-1, -1, width), sources, reduce="sum")
    y = torch.cat([unmerged, y_b], dim=1)
    return y[..., :-1] / y[..., -1:], y[..., -1:]


class ScatterToMe(nn.Module):
    def __init__(self, model: nn.Module, r: list[int]):
        super().__init__()
        self.model, self.r, self.parts = model.eval(), r, vit_parts(model)

    def forward(self, images):
        p = self.parts
        x, size = p.embed(images), None
        for block, r in zip(p.blocks, self.r):
            out, metric, _, _ = attention_parts(block, block.norm1(x), size)
            x = x + block.ls1(out)
            if r:
                if size is None:
                    size = torch.ones_like(x[..., :1])
                x, size = scatter_merge(x, size, metric, r, p.has_class_token)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return p.head(x)


def export_peer(model: nn.Module, path: Path, exporter: str) -> str:
    sample = torch.zeros(1, 3, 224, 224)
    try:
        with torch.no_grad():
            if exporter == "torchscript":
                torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            else:
                torch.onnx.export(model, (sample,), str(path), dynamo=True, external_data=True,
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}})
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return f"export failed: {str(exc).splitlines()[0][:160]}"
    return "exported"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    batches = [1, 8]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_model(f"timm:{args.model}", tmp / "base.onnx", seed=0).onnx_path
        ours = convert(base, tmp / "tome", ConvertOptions(method="tome", tome_r=args.r, build=False))
        r = ours.decisions["tome"]["r"]
        model = build_model(ReferenceRecord.load(ReferenceRecord.path_for(base)))
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32))
        with torch.no_grad():
            want, peer_out = ToMeViT(model, r)(x), ScatterToMe(model, r)(x)
        diff = float((want - peer_out).abs().max() / want.abs().max())
        print(f"peer vs vit2trt reference in PyTorch: relative error {diff:.2e}, "
              f"top-1 agreement {(want.argmax(1) == peer_out.argmax(1)).float().mean():.3f}")
        variants = {"uncompressed": base, f"vit2trt ToMe r={args.r}": ours.onnx_path}
        for exporter in ("torchscript", "dynamo"):
            path = tmp / f"peer_{exporter}.onnx"
            status = export_peer(ScatterToMe(model, r).eval(), path, exporter)
            if status == "exported":
                try:
                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                    error = float(np.abs(got - want.numpy()).max() / want.abs().max())
                    status = f"loads in ONNX Runtime, relative error {error:.1e}"
                    variants[f"peer ToMe ({exporter})"] = path
                except Exception as exc:  # noqa: BLE001
                    status = f"ONNX Runtime refuses it: {str(exc).splitlines()[0][:160]}"
                build = build_engine(path)
                status += f"; TensorRT: {build.status}" + (f" ({build.message[:160]})" if build.status == "failed" else "")
            print(f"peer ToMe, {exporter} exporter: {status}")
        ours_build = build_engine(ours.onnx_path)
        print(f"vit2trt ToMe: TensorRT: {ours_build.status}")
        # The peer graphs make the same merges: count their FLOPs as vit2trt's.
        merged_flops = read_vit(ours.onnx_path).flops.total
        flops = {name: read_vit(base).flops.total if name == "uncompressed" else merged_flops for name in variants}
        timings = paired_speedups(variants, batches, args.repeats, args.threads, flops=flops)
        print_speed_table(f"{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, at least "
                          f"{args.repeats} paired rounds per figure", flops, timings, batches)


if __name__ == "__main__":
    main()
