"""A Hugging Face model under dynlens: a tiny GPT2LMHeadModel (transformers' own code: dict
inputs, attention masks, its SDPA attention, ModelOutput results).

Checks Hessian-vector products by both methods against central differences of the gradient
(float64), the top eigenvalues, the trace, gradient coherence, and a Lens with every default
probe over AdamW steps under bfloat16 autocast (no failure events). Needs ``transformers``
(not a dependency of dynlens).

    python benchmarks/compat_transformers.py [--device cuda]
"""
import argparse
import tempfile

import torch
import transformers
from torch import nn

import dynlens as dl
from dynlens.functional import ModelFunction, flatten, isolated

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
dev = parser.parse_args().device
print("transformers", transformers.__version__, "torch", torch.__version__, "device", dev)
torch.manual_seed(0)
cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
model = transformers.GPT2LMHeadModel(cfg).to(dev)
ids = torch.randint(0, 64, (8, 16), device=dev)
mask = torch.ones_like(ids)
mask[:, -3:] = 0  # padding at the end of every sequence
batch = ({"input_ids": ids, "attention_mask": mask}, ids)

def lm_loss(outputs, targets):
    logits = outputs.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))

print("attention implementation:", getattr(model.config, "_attn_implementation", None))
m64 = model.double()
with isolated(m64):
    fn = ModelFunction(m64, lm_loss, batch)
    v = torch.randn(fn.num_params, dtype=torch.float64, device=dev)
    eps = 1e-5
    plus, minus = fn.grad(fn.as_params(fn.vector() + eps * v)), fn.grad(fn.as_params(fn.vector() - eps * v))
    fd = (flatten(plus) - flatten(minus)) / (2 * eps)
    for method in ("reuse", "forward_over_reverse"):
        try:
            hv = fn.curvature_products("hessian", method)[0](v)
            print(method, "rel err vs FD", ((hv - fd).norm() / fd.norm()).item())
        except Exception as e:
            print(method, "ERR", type(e).__name__, str(e)[:200])
model = model.float()
r = dl.hessian_eigenvalues(model, lm_loss, batch, k=3)
print("eig", r.values.tolist(), r.matvecs, r.converged)
print("trace", dl.hessian_trace(model, lm_loss, batch, samples=12).value)
try:
    c = dl.gradient_coherence(model, lm_loss, batch)
    print("coherence alpha", c.alpha, c.method)
except Exception as e:
    print("coherence ERR", type(e).__name__, str(e)[:300])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
with tempfile.TemporaryDirectory() as d:
    with dl.Lens(model, lm_loss, batch, opt, run_dir=d, probes="default") as lens:
        model.train()
        for _ in range(6):
            opt.zero_grad()
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = model(**batch[0])
                loss = lm_loss(out, batch[1])
            loss.backward()
            opt.step()
            lens.step(loss=loss)
    run = dl.load_run(d)
    print("events", run.events().message.tolist()[:5])
    print("probes", run.probes())
    print(run.scalars().groupby(["probe", "name"]).value.last().loc[["hessian"]].to_dict())
