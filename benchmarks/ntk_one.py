"""One NTK kernel of the CIFAR ResNet-18 in its own process, with the traceback if it fails: for
the CUDA "illegal memory access" that stopped ``benchmarks/ntk.py`` at its first ResNet-18 kernel
(an error of that kind spoils every later CUDA call of the process, so each configuration needs
a fresh one).

    python benchmarks/ntk_one.py structured 64 0            # implementation, n, memory GiB (0: default)
    CUDA_LAUNCH_BLOCKING=1 python benchmarks/ntk_one.py structured 64 0 trace
    python benchmarks/ntk_one.py tutorial 64 0 full nocudnn
    python benchmarks/ntk_one.py structured 64 0 calls=3      # the same kernel three times
    python benchmarks/ntk_one.py structured 64 0 calls=2 release alarm probes

The last three words each add one thing ``benchmarks/ntk.py`` does and this script otherwise
does not (that script stops at its first ResNet-18 kernel on an H200 with "an illegal memory
access"; this one, with none of them, runs): ``release``, before each call ``gc.collect()``, a
synchronisation, ``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()``; ``alarm``, a
``SIGALRM`` handler and a 30-s interval timer around each call; ``probes``, importing
``dynlens.probes`` (ntk.py imports the NTK probe).

Found (eighth session): the process-spoiling kernel was not ours but the torch.func tutorial's
NTK-vector products, the last method ``ntk.py`` ran; its error surfaced at the next
synchronisation and took the case's printed row with it. ``ntk.py --methods`` runs one method a
process now. This script stays as the minimal reproduction of a single kernel.

Prints one JSON line: the configuration, whether it ran, what ``auto`` chose, seconds, the peak
GiB and one kernel entry (or the error and the end of its traceback).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

from dynlens.functional import isolated  # noqa: E402
from dynlens.measures.ntk import ntk_of  # noqa: E402


def main() -> None:
    method, n, gib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    mode = next((a for a in sys.argv[4:] if a in ("trace", "full")), "trace")
    calls = next((int(a.removeprefix("calls=")) for a in sys.argv[4:] if a.startswith("calls=")), 1)
    if "nocudnn" in sys.argv:
        torch.backends.cudnn.enabled = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "probes" in sys.argv:
        import dynlens.probes  # noqa: F401
    if "alarm" in sys.argv:
        signal.signal(signal.SIGALRM, lambda signum, frame: (_ for _ in ()).throw(TimeoutError("30 s")))
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10, width=64).to(device).eval()
    x = models.image_batch(n)[0].to(device)
    began = time.perf_counter()
    try:
        if method == "tutorial":
            import ntk as bench

            with isolated(model, "eval"):
                kernel, chose = bench.tutorial_jacobian(model, x, mode), method
        else:
            for call in range(calls):
                if "release" in sys.argv:
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                if "alarm" in sys.argv:
                    signal.setitimer(signal.ITIMER_REAL, 30.0)
                result = ntk_of(model, x, mode=mode, implementation=method,  # type: ignore[arg-type]
                                memory=None if gib == 0 else int(gib * 2**30))
                kernel, chose = result.kernel, result.implementation
                if device == "cuda":
                    torch.cuda.synchronize()
                if "alarm" in sys.argv:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                print(json.dumps({"call": call, "kernel00": float(kernel.reshape(-1)[0])}), flush=True)
        if device == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"config": sys.argv[1:], "ok": True, "chose": chose,
                          "seconds": time.perf_counter() - began,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                          "kernel00": float(kernel.reshape(-1)[0])}))
    except BaseException as err:  # noqa: BLE001 - the point is to report it
        print(json.dumps({"config": sys.argv[1:], "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}",
                          "where": traceback.format_exc()[-3000:]}))


if __name__ == "__main__":
    main()
