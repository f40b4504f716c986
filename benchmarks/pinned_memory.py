"""What host memory costs a Lanczos basis kept there for a GPU operator: allocating pinned
memory, and copying to the device from pinned and from pageable memory in 64-MiB pieces (the
pieces of ``dynlens.linalg.lanczos._streamed_gram_schmidt``).

    python benchmarks/pinned_memory.py --gib 0.5 2 4

For each size: pinned allocation (and touching one number a MiB), pageable allocation and fill,
pinned allocation again after freeing one of the same size (PyTorch's host allocator keeps the
block), a pinned allocation plus a host copy into it (what growing a one-tensor basis did), and
the host-to-device copy rates in pieces from both kinds of memory. Prints one line per result.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.ones(1, device=device)
    torch.cuda.synchronize()
    for gib in args.gib:
        n = int(gib * 2**30) // 4
        start = time.perf_counter()
        pinned = torch.empty(n, pin_memory=True)
        pinned[:: 2**18] = 0
        pin_s = time.perf_counter() - start
        start = time.perf_counter()
        pageable = torch.empty(n)
        pageable.fill_(0)
        pageable_s = time.perf_counter() - start
        start = time.perf_counter()
        again = torch.empty(n, pin_memory=True)
        again_s = time.perf_counter() - start
        del again
        start = time.perf_counter()
        cached = torch.empty(n, pin_memory=True)
        cached_s = time.perf_counter() - start
        del cached
        target = torch.empty(n, device=device)
        rates = {}
        for source, name in ((pinned, "pinned"), (pageable, "pageable")):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step = 16 * 2**20  # 64 MiB of float32
            for s in range(0, n, step):
                target[s:s + step].copy_(source[s:s + step], non_blocking=True)
            torch.cuda.synchronize()
            rates[name] = gib / (time.perf_counter() - start)
        start = time.perf_counter()
        grown = torch.empty(n, pin_memory=True)
        grown.copy_(pinned)
        grown_s = time.perf_counter() - start
        print(f"{gib} GiB: pinned allocation {pin_s:.3f} s (another {again_s:.3f} s, after freeing one "
              f"{cached_s:.4f} s), pageable allocation and fill {pageable_s:.3f} s, pinned allocation and "
              f"host copy {grown_s:.3f} s; to the device in 64-MiB pieces: pinned {rates['pinned']:.1f} GiB/s, "
              f"pageable {rates['pageable']:.1f} GiB/s", flush=True)
        del pinned, pageable, target, grown


if __name__ == "__main__":
    main()
