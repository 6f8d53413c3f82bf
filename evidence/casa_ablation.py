"""Ablation of mode ``casa``'s parts on the zoo (3 evaluation seeds, 192 images per seed):

    .venv/bin/python -m evidence.casa_ablation style descendant_a descendant_b descendant_a_near     # ~6 min on one core
    .venv/bin/python -m evidence.casa_ablation concept descendant_a descendant_b descendant_a_near

Per variant (Copy, ``prolora-full``, ``casa`` at its defaults and with one part switched off or
pushed to an end) it prints and writes (``$CASA_ABLATION_OUT`` or ``/tmp/casa_ablation_<lora>.json``)
the gap closed on the loss and in the target's domain (as in ``evidence.protocol``) and
``plain_rel``: the relative change of the target's loss on the plain (unedited) images of its own
domain, under the same prompts as the in-domain measure, against No LoRA.
"""
import json
import os
import sys
import time

from . import configure_host

configure_host()

import torch  # noqa: E402
import safetensors.torch  # noqa: E402

from prolora_core.casa import CasaSettings  # noqa: E402
from prolora_core.transfer import TransferConfig, plan_by_names, transfer  # noqa: E402

from . import ZOO_DIR  # noqa: E402
from .lora_utils import deltas_from_kohya, merged_params  # noqa: E402
from .models import diffusion_loss  # noqa: E402
from .protocol import PAIRING, Evaluator, Zoo, mean  # noqa: E402

torch.set_num_threads(1)

VARIANTS = [("copy", "copy", CasaSettings()), ("prolora-full", "prolora-full", CasaSettings()),
            ("casa (default: ρ 0.5, τ 0.5, q 0.85)", "casa", CasaSettings()),
            ("casa ρ=0 (every top group dense)", "casa", CasaSettings(rho=0.0)), ("casa ρ=1 (one group dense)", "casa", CasaSettings(rho=1.0)),
            ("casa τ=∞ (no groups)", "casa", CasaSettings(tau=1e30)), ("casa q=1 (no arbitration)", "casa", CasaSettings(arbitrate_q=1.0))]


@torch.no_grad()
def plain_loss(ev: Evaluator, t, lora: str, deltas, seed: int) -> float:
    """The target's loss on plain images of its own domain (the in-domain measure's unedited half)."""
    plain, _, ctx, noise, sigma = ev.domain_draw(lora, t.domain, seed)
    params = {**t.state, **(merged_params(t.state, deltas) if deltas else {})}
    return float(torch.cat([diffusion_loss(t.patcher.model, params, plain[i:i + 128], ctx[i:i + 128], noise[i:i + 128], sigma[i:i + 128])
                            for i in range(0, plain.shape[0], 128)]).mean())


def main(argv: list[str]) -> None:
    lora, targets = argv[0], argv[1:]
    zoo = Zoo(ZOO_DIR)
    ev = Evaluator(zoo, 192, [0, 1, 2])
    out = []
    for tname in targets:
        t = zoo.target(tname)
        trained = deltas_from_kohya(safetensors.torch.load_file(str(zoo.lora_path(lora, tname))), t.state)
        ends = ev.ends(t, trained, lora)
        lf = zoo.source_lora(lora)
        pairing = PAIRING.get(tname, "name")
        base = [plain_loss(ev, t, lora, None, s) for s in ev.seeds]
        for label, mode, st in VARIANTS:
            cfg = TransferConfig(mode=mode, device="cpu", casa=st, pairing="name" if mode == "copy" else pairing)
            (res,), _ = transfer([lf], plan_by_names([lf], zoo.source.weights), zoo.source.weights, t.weights, cfg)
            d = deltas_from_kohya(res.tensors, t.state)
            g, ig = ev.gaps(t, d, lora, ends)
            pl = [plain_loss(ev, t, lora, d, s) / b - 1.0 for s, b in zip(ev.seeds, base)]
            out.append(dict(lora=lora, target=tname, variant=label, gap=g, igap=ig, plain_rel=pl))
            print(f"[{time.strftime('%H:%M:%S')}] {lora} {tname} {label}: {mean(g):.3f} / {mean(ig):.3f} / plain {mean(pl):+.4f}", flush=True)
        pt = [plain_loss(ev, t, lora, trained, s) / b - 1.0 for s, b in zip(ev.seeds, base)]
        out.append(dict(lora=lora, target=tname, variant="trained", gap=[1.0] * 3, igap=[1.0] * 3, plain_rel=pt))
        print(f"{lora} {tname} trained plain {mean(pt):+.4f}", flush=True)
        with open(os.environ.get("CASA_ABLATION_OUT", f"/tmp/casa_ablation_{lora}.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
