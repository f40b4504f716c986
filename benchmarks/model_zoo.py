"""The model zoo under the Lens (issue #17, item 3): does every probe measure every model, and
does training stay bit-identical?

The models: every classification model of torchvision (``torchvision.models.list_models``),
a representative set of timm families (ResNet, ConvNeXt, EfficientNet, MobileNetV3, ViT, Swin,
MLP-Mixer, RegNet) and Hugging Face architectures from small configurations (GPT-2 and Llama as
causal LMs, BERT and T5 as sequence classifiers, ViT as an image classifier). Each is built
from its constructor with no weights (no download: torchvision ``weights=None``, timm
``pretrained=False``, transformers ``from_config``), directly on the device, with 10 classes and
small inputs (64×64 images unless the model needs another size; the record says which).

For each model, run A trains ``--steps`` AdamW steps (batch 8, bfloat16 autocast on CUDA,
float32 on the CPU) without dynlens; run B repeats it from the same initial state (a copy of
the state dict), seed and data with a :class:`dynlens.Lens` stepped every step, every built-in
probe attached every 2 steps (:func:`every_probe`; ``budget=None``, ``memory_budget=0.5`` of the
GPU's memory, or ``--memory-budget``), on a fixed probe batch of 4. Recorded per model: ``result`` (pass/fail) and,
for a failure, ``reason``; whether the losses and the final parameters and buffers are
bit-identical between A and B (``torch.equal``; when they differ, A is run once more, and if A
differs from itself the training is not deterministic on that device and identity is not
testable: noted, not a failure); each probe's number of measurements; every warning and error
event of the run (a probe's failure is an event: a failure of the model), and the probes
that waited for memory (info, not a failure). Any exception is a failure, recorded as its type
and first line, with the layer (module name) if it names one. A model passes with no
exception, no error or warning event, every probe measured (or waiting for memory) and
identical training.

The results file is rewritten after every model (partial results survive a kill);
``--resume`` skips the models a results file holds already.

On a 2-GPU machine (the two shards in parallel, one per GPU, then one table of both)::

    CUDA_VISIBLE_DEVICES=0 python benchmarks/model_zoo.py --shard 0/2 --out benchmarks/results/model_zoo_h100_0.json > zoo0.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 python benchmarks/model_zoo.py --shard 1/2 --out benchmarks/results/model_zoo_h100_1.json > zoo1.log 2>&1 &
    wait
    python benchmarks/model_zoo.py --table benchmarks/results/model_zoo_h100_0.json benchmarks/results/model_zoo_h100_1.json

After a kill, the same command with ``--resume PATH`` (and the same ``--out``, or none: it then
writes to PATH) goes on where it stopped. A quick check on the CPU::

    python benchmarks/model_zoo.py --device cpu --only resnet18 mobilenet_v3_small --steps 2
    python benchmarks/model_zoo.py --device cpu --families hf --only gpt2 bert --steps 2

``--list`` prints the models (after ``--families``, ``--only`` and ``--shard``) and exits.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model from its config: nothing to download

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import image_batch  # noqa: E402
from second_derivatives import failure  # noqa: E402

import dynlens as dl  # noqa: E402
from dynlens.batches import call_model, logits_of, to_device  # noqa: E402

FAMILIES = ("torchvision", "timm", "hf")
NUM_CLASSES = 10
BATCH = 8  # training examples a step
PROBE_BATCH = 4  # examples the probes measure
EVERY = 2  # every probe's schedule
IMAGE_SIZE = 64
LR = 1e-4

# timm: (model, img_size or None where the family takes no such argument)
TIMM_MODELS: list[tuple[str, int | None]] = [
    ("resnet18", None), ("resnet50", None),
    ("convnext_atto", None), ("convnext_tiny", None),
    ("efficientnet_b0", None),
    ("mobilenetv3_small_100", None), ("mobilenetv3_large_100", None),
    ("vit_tiny_patch16_224", IMAGE_SIZE), ("vit_small_patch16_224", IMAGE_SIZE),
    ("swin_tiny_patch4_window7_224", IMAGE_SIZE),
    ("mixer_s16_224", IMAGE_SIZE), ("mixer_b16_224", IMAGE_SIZE),
    ("regnetx_002", None), ("regnety_002", None),
]

# torchvision models by their cost here (the largest last within a shard); unlisted: 0
HEAVY = {
    3: ("regnet_y_128gf", "vit_h_14"),
    2: ("vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf", "efficientnet_b7", "efficientnet_v2_l",
        "vgg", "convnext_large", "swin_v2_b", "swin_b", "wide_resnet101_2", "maxvit_t"),
    1: ("convnext_base", "efficientnet_b6", "efficientnet_b5", "efficientnet_v2_m", "resnet152",
        "resnext101", "densenet", "wide_resnet50_2", "swin_v2_s", "swin_s", "vit_b_", "inception_v3"),
}


@dataclass
class Entry:
    """One model of the zoo: how to build it and its data."""

    name: str  # family/model
    family: str
    build: Callable[[], nn.Module]
    data: Callable[[int, int], tuple[Any, Any]]  # (n examples, seed) -> (inputs, targets) on the CPU
    loss_fn: Callable[[Any, Any], Tensor]
    input: str  # what an example is, for the record
    cost: int = 0
    notes: list[str] = field(default_factory=list)


def every_probe() -> list[dl.Probe]:
    """Every built-in probe every ``EVERY`` steps, their optional parts on dense sub-schedules
    (as in ``tests/test_no_side_effects.py``) and cheap: the Hessian's λ_min, trace and one short
    density every 2nd measurement, at most 20 Lanczos steps and 8 trace samples; stiffness and
    naive-loss-minimisation alignment every 2nd; the NTK on 4 examples."""
    probes = [p.with_schedule(every=EVERY) for p in dl.probes.basic()]
    probes += [
        dl.probes.Hessian(every=EVERY, extras_every=2, density=True, density_runs=1, density_iters=8,
                          max_iters=20, trace_samples=8),
        dl.probes.Coherence(every=EVERY, stiffness_every=2),
        dl.probes.WeightSpectrum(every=EVERY),
        dl.probes.SoftmaxCollapse(every=EVERY, nlm_every=2),
        dl.probes.OpposingSignals(every=EVERY),
        dl.probes.NTK(every=EVERY, n=PROBE_BATCH),
    ]
    names = {p.name for p in probes}
    # a built-in probe added later joins with its own settings
    probes += [p.with_schedule(every=EVERY) for p in dl.probes.default() if p.name not in names]
    return probes


def image_data(size: int) -> Callable[[int, int], tuple[Tensor, Tensor]]:
    return lambda n, seed: image_batch(n, size=size, num_classes=NUM_CLASSES, seed=seed)


def torchvision_entries() -> list[Entry]:
    import torchvision

    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        kwargs: dict[str, Any] = {}
        size = IMAGE_SIZE
        notes = []
        if name.startswith("vit_"):  # image_size: a multiple of the patch size
            patch = int(name.rsplit("_", 1)[1])
            size = patch * math.ceil(IMAGE_SIZE / patch)
            kwargs["image_size"] = size
        elif name == "maxvit_t":  # each stage's grid a multiple of the 7×7 partitions: 224 at least
            size = 224
            kwargs["input_size"] = (size, size)
        elif name == "inception_v3":  # 75×75 at least
            size = 80
            kwargs.update(aux_logits=False, init_weights=True)
            notes.append("aux_logits=False")
        elif name == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
            notes.append("aux_logits=False")
        cost = max([c for c, names in HEAVY.items() if any(name.startswith(n) for n in names)], default=0)
        entries.append(Entry(
            f"torchvision/{name}", "torchvision",
            lambda name=name, kwargs=kwargs: torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs),
            image_data(size), nn.CrossEntropyLoss(), f"3×{size}×{size}", cost, notes))
    return entries


def timm_entries() -> list[Entry]:
    import timm

    known = set(timm.list_models())
    entries = []
    for name, img_size in TIMM_MODELS:
        kwargs = {} if img_size is None else {"img_size": img_size}
        if name not in known:
            print(f"timm {timm.__version__} has no {name}: left out", flush=True)
            continue
        entries.append(Entry(
            f"timm/{name}", "timm",
            lambda name=name, kwargs=kwargs: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs),
            image_data(IMAGE_SIZE), nn.CrossEntropyLoss(), f"3×{IMAGE_SIZE}×{IMAGE_SIZE}"))
    return entries


def logits_cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    """Cross-entropy of a classifier's logits (a tensor or a Hugging Face ``ModelOutput``)."""
    return F.cross_entropy(logits_of(outputs).float(), targets)


def hf_entries() -> list[Entry]:
    import transformers as tr

    from dynlens.integrations.hf import causal_lm_batch, causal_lm_loss

    vocab, length = 128, 16

    def tokens(n: int, seed: int, low: int = 0) -> tuple[Tensor, Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(low, vocab, (n, length), generator=g)
        mask = torch.ones_like(ids)
        mask[n // 2:, -3:] = 0  # half the sequences padded at the end
        return ids, mask, g

    def lm_data(n: int, seed: int) -> tuple[Any, Any]:
        ids, mask, _ = tokens(n, seed)
        return causal_lm_batch({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def text_data(n: int, seed: int) -> tuple[Any, Any]:
        ids, mask, g = tokens(n, seed)
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def t5_data(n: int, seed: int) -> tuple[Any, Any]:
        # T5's classifier reads the decoder at the one <eos> every sequence must end with
        ids, _, g = tokens(n, seed, low=2)
        ids[:, -1] = 1
        return {"input_ids": ids}, torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def vit_data(n: int, seed: int) -> tuple[Any, Any]:
        x, y = image_batch(n, size=32, num_classes=NUM_CLASSES, seed=seed)
        return {"pixel_values": x}, y

    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}
    configs: list[tuple[str, Callable[[], nn.Module], Callable[[int, int], tuple[Any, Any]], Callable[[Any, Any], Tensor], str]] = [
        ("gpt2", lambda: tr.AutoModelForCausalLM.from_config(
            tr.GPT2Config(vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
         lm_data, causal_lm_loss, f"{length - 1} tokens (causal_lm_batch), vocabulary {vocab}"),
        ("llama", lambda: tr.AutoModelForCausalLM.from_config(
            tr.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=1, **small)),
         lm_data, causal_lm_loss, f"{length - 1} tokens (causal_lm_batch), vocabulary {vocab}"),
        ("bert", lambda: tr.AutoModelForSequenceClassification.from_config(
            tr.BertConfig(vocab_size=vocab, max_position_embeddings=64, num_labels=NUM_CLASSES, **small)),
         text_data, logits_cross_entropy, f"{length} tokens, 10 labels"),
        ("t5", lambda: tr.AutoModelForSequenceClassification.from_config(
            tr.T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                        num_heads=2, num_labels=NUM_CLASSES)),
         t5_data, logits_cross_entropy, f"{length} tokens ending in <eos>, 10 labels"),
        ("vit", lambda: tr.AutoModelForImageClassification.from_config(
            tr.ViTConfig(image_size=32, patch_size=8, num_labels=NUM_CLASSES, **small)),
         vit_data, logits_cross_entropy, "3×32×32, patches 8×8"),
    ]
    return [Entry(f"hf/{name}", "hf", build, data, loss, desc) for name, build, data, loss, desc in configs]


def zoo(families: Sequence[str]) -> list[Entry]:
    """The models of these families, cheapest first (a stable sort: each family in its order)."""
    entries: list[Entry] = []
    makers = {"torchvision": torchvision_entries, "timm": timm_entries, "hf": hf_entries}
    for family in families:
        try:
            entries += makers[family]()
        except Exception as err:  # noqa: BLE001 - a missing or broken library: the family is left out
            print(f"skipping the {family} models: {failure(err)}", flush=True)
    return sorted(entries, key=lambda e: e.cost)


def layer_named(text: str, model: nn.Module | None) -> str | None:
    """The longest module name of ``model`` that ``text`` names (quoted, or dotted), if any."""
    if model is None:
        return None
    names = {n for n, _ in model.named_modules() if n}
    found = [t for t in re.findall(r"[\w.]+", text) if t in names and ("." in t or f"'{t}'" in text or f'"{t}"' in text)]
    return max(found, key=len) if found else None


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any, Any], Tensor],
          batches: list[tuple[Any, Any]], device: torch.device, lens: dl.Lens | None = None) -> list[Tensor]:
    """The steps on these batches; each step's loss (detached, on the device)."""
    losses = []
    model.train()
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(call_model(model, inputs), targets)
        loss.backward()
        optimizer.step()
        if lens is not None:
            lens.step(loss=loss)
        losses.append(loss.detach())
    return losses


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def differing(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def measure(entry: Entry, device: torch.device, steps: int, record: dict[str, Any], run_dir: str,
            memory_budget: float = 0.5) -> None:
    """Runs A (and A again, should B differ) and B for one model, filling ``record``."""
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = entry.build()
    record["_model"] = model  # for layer_named should anything raise; dropped before writing
    record["params"] = sum(p.numel() for p in model.parameters())
    batches = [to_device(entry.data(BATCH, seed), device) for seed in range(1, steps + 1)]
    probe_batch = to_device(entry.data(PROBE_BATCH, 1000), device)
    init = copy.deepcopy(model.state_dict())  # with its _metadata: MNASNet's loader reads the version

    def run(lens_dir: str | None) -> tuple[list[Tensor], dict[str, Tensor], float]:
        model.load_state_dict(init)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        torch.manual_seed(0)
        start = time.perf_counter()
        if lens_dir is None:
            losses = train(model, optimizer, entry.loss_fn, batches, device)
        else:
            memory = memory_budget if device.type == "cuda" else None
            with dl.Lens(model, entry.loss_fn, probe_batch, optimizer, run_dir=lens_dir, probes=every_probe(),
                         name=entry.name, budget=None, memory_budget=memory) as lens:
                losses = train(model, optimizer, entry.loss_fn, batches, device, lens)
            record["disabled"] = list(lens.disabled)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return losses, state(model), time.perf_counter() - start

    losses_a, final_a, record["seconds_without"] = run(None)
    record["losses"] = [float(v) for v in losses_a]
    losses_b, final_b, record["seconds_with"] = run(run_dir)
    same_losses = all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    differ = differing(final_a, final_b)
    record["identical"] = {"losses": same_losses, "parameters_and_buffers": not differ, "differing": differ[:5]}
    if not same_losses or differ:
        losses_c, final_c, _ = run(None)
        record["identical"]["deterministic_without_lens"] = (
            all(torch.equal(a, c) for a, c in zip(losses_a, losses_c)) and not differing(final_a, final_c))
    del final_a, final_b

    info = dl.load_run(run_dir)
    scalars = info.scalars()
    record["measurements"] = {}
    for probe in every_probe():  # the steps with a scalar or an array of the probe
        steps = set(scalars.step[scalars.probe == probe.name].tolist())
        steps |= {step for name in info.array_names(probe.name) for step, _ in info.arrays(probe.name, name)}
        record["measurements"][probe.name] = len(steps)
    events = []
    for row in info.events().itertuples():
        message = str(row.message)
        kind = "waits for memory" if row.level == "info" and "waits for memory" in message else row.level
        event = {"step": None if row.step is None or row.step != row.step else int(row.step), "level": kind,
                 "probe": row.probe, "message": message.strip().splitlines()[0][:400] if message.strip() else ""}
        layer = layer_named(f"{message}\n{row.traceback or ''}", model)
        if layer:
            event["layer"] = layer
        events.append(event)
    record["events"] = events


def verdict(record: dict[str, Any]) -> None:
    """``result`` and ``reason`` from what :func:`measure` recorded."""
    reasons = []
    if "error" in record:
        reasons.append(record["error"] + (f" (layer {record['layer']})" if record.get("layer") else ""))
    for event in record.get("events", []):
        if event["level"] in ("error", "warning"):
            reasons.append(f"{event['probe']}: {event['message']}" + (f" (layer {event['layer']})" if event.get("layer") else ""))
    waiting = {e["probe"] for e in record.get("events", []) if e["level"] == "waits for memory"}
    for probe, count in record.get("measurements", {}).items():
        if count == 0 and probe not in waiting and not any(probe == e["probe"] for e in record.get("events", [])):
            reasons.append(f"{probe}: no measurement and no event saying why")
    same = record.get("identical")
    if same and not (same["losses"] and same["parameters_and_buffers"]):
        if same.get("deterministic_without_lens", True):
            reasons.append(f"training with the Lens differs from training without it (losses identical: {same['losses']}, "
                           f"first differing tensors: {same['differing']})")
        else:
            record.setdefault("notes", []).append("training is not deterministic on this device without dynlens either: "
                                                  "bit-identity not testable")
    if waiting:
        record.setdefault("notes", []).append(f"waits for memory: {', '.join(sorted(waiting))}")
    # de-duplicated, in order: a probe failing at several steps is one reason
    unique = list(dict.fromkeys(re.sub(r" at step \d+", "", r) for r in reasons))
    record["result"] = "fail" if unique else "pass"
    if unique:
        record["reason"] = "; ".join(unique)


class ModelTimeout(BaseException):
    """A model ran past ``--model-seconds`` (a BaseException: the Lens's guard of a probe must
    not take it for that probe's failure)."""


def _alarm(signum: int, frame: Any) -> None:  # noqa: ARG001 - a signal handler's signature
    raise ModelTimeout


def one(entry: Entry, device: torch.device, steps: int, runs: str | None, limit: int = 0,
        memory_budget: float = 0.5) -> dict[str, Any]:
    record: dict[str, Any] = {"model": entry.name, "family": entry.family, "input": entry.input,
                              "notes": list(entry.notes)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(runs, entry.name.replace("/", "_")) if runs else os.path.join(tmp, "run")
        if limit:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(limit)
        try:
            measure(entry, device, steps, record, run_dir, memory_budget)
        except ModelTimeout:
            record["error"] = f"timed out: more than {limit} s (--model-seconds)"
        except Exception as err:  # noqa: BLE001 - one model's failure is a row of the table
            record["error"] = failure(err)
            layer = layer_named(str(err), record.get("_model"))
            if layer:
                record["layer"] = layer
            if isinstance(err, torch.OutOfMemoryError):
                record["error"] += " (out of memory outside the probes: training and its copies)"
        finally:
            if limit:
                signal.alarm(0)
    record.pop("_model", None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    record["seconds"] = round(time.perf_counter() - start, 2)
    verdict(record)
    return record


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "dynlens": dl.__version__, "python": platform.python_version()}
    for lib in ("torchvision", "timm", "transformers"):
        try:
            versions[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - not installed or not loadable
            versions[lib] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions, "steps": args.steps, "batch": BATCH, "probe_batch": PROBE_BATCH, "every": EVERY,
        "optimizer": f"AdamW(lr={LR})", "autocast": "bfloat16" if device.type == "cuda" else None,
        "shard": args.shard, "families": args.families, "only": args.only,
    }


def write(path: Path, meta: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "models": records}, indent=1, default=str))
    os.replace(tmp, path)


def measurements_cell(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    values = list(counts.values())
    common = max(set(values), key=values.count)
    others = [f"{p} {c}" for p, c in counts.items() if c != common]
    return f"all {common}" + (f" except {', '.join(others)}" if others else "")


def table(paths: Sequence[str]) -> None:
    """One markdown table of the results files (a model in several: the last one's)."""
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        print(f"<!-- {path}: {meta['device']}, {meta['date']}, "
              f"{', '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)} -->")
        records.update(data["models"])
    print("| model | family | params | input | result | measurements per probe | seconds (A / B) | reason |")
    print("|---|---|---:|---|---|---|---|---|")
    for name, r in records.items():
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else ""
        notes = "; ".join(r.get("notes", []))
        times = f"{r.get('seconds_without', 0):.1f} / {r.get('seconds_with', 0):.1f}" if "seconds_with" in r else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        print(f"| {name} | {r['family']} | {params} | {r['input']} | {r['result']} | "
              f"{measurements_cell(r.get('measurements', {}))} | {times} | {reason}{' — ' + notes if notes else ''} |")
    failed = sum(r["result"] == "fail" for r in records.values())
    print(f"\n{len(records)} models, {len(records) - failed} passed, {failed} failed.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: torchvision,timm,hf")
    parser.add_argument("--only", nargs="*", default=None, help="models whose name contains one of these")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model-seconds", type=int, default=0, help="give up on a model after this long (0: never)")
    parser.add_argument("--memory-budget", type=float, default=0.5,
                        help="the Lens's memory_budget on a GPU, a fraction of its memory (lower it to run "
                             "several shards on one GPU at once)")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th model from the I-th (0-based)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/model_zoo_<device>[_shard].json)")
    parser.add_argument("--resume", default=None, help="a results file: skip its models, and write to it unless --out")
    parser.add_argument("--runs", default=None, help="keep each model's run database in this directory")
    parser.add_argument("--list", action="store_true", help="print the models and exit")
    parser.add_argument("--table", nargs="+", default=None, help="print a markdown table of these results files")
    args = parser.parse_args()
    if args.table:
        table(args.table)
        return

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {','.join(FAMILIES)}")
    index, count = (int(v) for v in args.shard.split("/"))
    if not 0 <= index < count:
        parser.error(f"--shard I/N needs 0 <= I < N, got {args.shard}")
    entries = [e for e in zoo(families) if args.only is None or any(s in e.name for s in args.only)][index::count]
    if args.list:
        for e in entries:
            print(f"{e.name:45s} {e.input}")
        print(f"{len(entries)} models")
        return

    device = torch.device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    tag = f"_{index}of{count}" if count > 1 else ""
    out = Path(args.out or args.resume or f"benchmarks/results/model_zoo_{device.type}{tag}.json")
    records: dict[str, dict[str, Any]] = {}
    if args.resume and Path(args.resume).exists():
        records = json.loads(Path(args.resume).read_text())["models"]
    meta = environment(device, args)
    print(f"{meta['device']}: {len(entries)} models ({sum(e.name in records for e in entries)} done already) -> {out}",
          flush=True)
    for entry in entries:
        if entry.name in records:
            continue
        records[entry.name] = record = one(entry, device, args.steps, args.runs, args.model_seconds,
                                           args.memory_budget)
        write(out, meta, records)
        counts = measurements_cell(record.get("measurements", {}))
        print(f"{entry.name:45s} {record['result']:4s} {record['seconds']:7.1f} s  {counts}"
              f"{'  ' + record['reason'][:300] if 'reason' in record else ''}", flush=True)
    failed = [n for n in records if records[n]["result"] == "fail"]
    print(f"{len(records)} models, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)


if __name__ == "__main__":
    main()
