"""Equality of the grouped-matmul backends (`moefuse.fusion.kernels.grouped_mm`: torch._grouped_mm "native" and
the per-expert "loop") in a dtype, on a device: outputs and both input gradients, each against an fp32 reference
of the same inputs, and the two backends against each other; then a whole SparseMoE layer (outputs and every
gradient) built once and run with each backend.

Groups of uneven size, one of them empty, as dispatch produces them. A backend passes when its largest error is
within the tolerance of the dtype relative to the reference's largest magnitude (fp32 1e-5, bf16 2e-2: 8 bits of
mantissa, accumulated over K_in products). The native backend is skipped, and said so, where torch has no kernel
for the inputs (`native_grouped_mm_available`: bf16 on CUDA sm80+, CPU when the dtypes agree).

Usage::

    python benchmarks/grouped_mm_check.py --device cuda --dtype bf16     # benchmarks/gpu_check.sh runs this
    python benchmarks/grouped_mm_check.py                                # fp32 on CPU
"""

from __future__ import annotations

import argparse
import sys

import torch
from _bench import command_line

from moefuse.fusion.kernels import grouped_mm, native_grouped_mm_available
from moefuse.fusion.moe import MoEConfig, SparseMoE

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def grouped_case(device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, dict[str, float]]:
    """x [S, K_in], w [E, K_in, N_out], uneven groups (one empty) -> {backend: {out, grad_x, grad_w: rel error}}."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([37, 0, 128, 5, 64, 91, 1, 200])  # E = 8 groups, one empty
    x32 = torch.randn(int(sizes.sum()), 256, generator=gen)
    w32 = torch.randn(len(sizes), 256, 512, generator=gen) / 16
    g32 = torch.randn(x32.shape[0], 512, generator=gen)
    offs = torch.cumsum(sizes, 0).to(torch.int32).to(device)

    def run(backend: str, dt: torch.dtype) -> tuple[torch.Tensor, ...]:
        x = x32.to(device, dt).clone().requires_grad_(True)
        w = w32.to(device, dt).clone().requires_grad_(True)
        out = grouped_mm(x, w, offs, backend)
        out.backward(g32.to(device, dt))
        return out.detach(), x.grad, w.grad

    ref = run("loop", torch.float32)
    results = {}
    probe = (x32[:16].to(device, dtype), w32.to(device, dtype))
    for backend in ("native", "loop"):
        if backend == "native" and not native_grouped_mm_available(*probe):
            continue
        got = run(backend, dtype)
        results[backend] = {name: rel_err(a, r) for name, a, r in zip(("out", "grad_x", "grad_w"), got, ref)}
    if len(results) == 2:
        a, b = run("native", dtype), run("loop", dtype)
        results["native vs loop"] = {name: rel_err(p, q) for name, p, q in zip(("out", "grad_x", "grad_w"), a, b)}
    return results


def layer_case(device: str, dtype: torch.dtype) -> dict[str, float] | None:
    """One SparseMoE (E=16, k=2) in `dtype`, native vs loop: rel error of the output and of every gradient."""
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(d_model=256, d_expert=512, num_experts=16, top_k=2)).to(device, dtype)
    x = torch.randn(2048, 256, device=device, dtype=dtype)
    if not native_grouped_mm_available(x, moe.experts.w_in):
        return None
    outs = {}
    for backend in ("native", "loop"):
        moe.cfg.backend = backend
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = moe(xi)
        (out.out.float().square().mean() + out.aux_loss).backward()
        outs[backend] = [out.out.detach(), xi.grad, *(p.grad for p in moe.parameters())]
    names = ["out", "grad_x", *(n for n, _ in moe.named_parameters())]
    return {n: rel_err(a, b) for n, a, b in zip(names, outs["native"], outs["loop"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tol = TOLERANCE[dtype]
    print(f"grouped_mm backends, {args.dtype} on {args.device}: largest error relative to the largest reference "
          f"magnitude (tolerance {tol:g})\n")
    failed = False
    results = grouped_case(args.device, dtype)
    for backend, errs in results.items():
        ok = max(errs.values()) <= tol
        failed |= not ok
        print(f"  {backend:<15} " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f"  {'ok' if ok else 'FAIL'}")
    if "native" not in results:
        print(f"  native          skipped: torch._grouped_mm has no kernel for {args.dtype} on {args.device}")
    layer = layer_case(args.device, dtype)
    if layer is None:
        print("\nSparseMoE native vs loop: skipped (no native kernel)")
    else:
        worst = max(layer, key=layer.get)
        ok = layer[worst] <= tol
        failed |= not ok
        print(f"\nSparseMoE (E=16, k=2, N=2048) native vs loop: largest relative difference {layer[worst]:.2e} "
              f"({worst}) {'ok' if ok else 'FAIL'}")
    print(f"\n{command_line()}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
