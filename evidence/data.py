"""A procedural image dataset (fixed seeds) for the tiny-UNet zoo.

Images are 8×8 RGB in [0, 1]. The "latent" IS the image: model space holds ``2·rgb − 1`` in
channels 0–2 and 0 in channel 3 (SD1.5 latents have roughly unit spread, so [-1, 1] sits in the
latent format's range). ComfyUI's SD15 latent format scales by 0.18215 on the way in and out, so a
sampled ``LATENT`` maps back to an image with :func:`latent_to_image`. An EmptyLatentImage of
64×64 gives 4×8×8 latents, so stock ComfyUI sampling fits.

Why 8×8 rather than 16×16: the level-0 self-attention over 256 tokens made one batch-32 training
step of the tiny UNet take ~1.5 s on the shared 2-core CPU against ~0.28 s at 8×8 (64 tokens),
and the whole zoo had to train in about half an hour.

Data families (all seeded):

* ``base``    — source domain: a disc, square or bar (class 0/1/2) in a saturated colour
                (red, green, blue, yellow) on a light grey-ish background.
* ``shifted`` — descendant A's fine-tuning mix: dark backgrounds, another palette
                (orange, cyan, magenta, white), more bars.
* ``style``   — the style LoRA's data: ``base`` images with a yellow diagonal-stripe overlay
                (period 4 px along x+y). Same prompts as ``base``: the LoRA restyles everything.
* ``concept`` — the concept LoRA's data: a red ring (annulus, centred ±1 px) on a light
                background, with its own prompt (class 3), which no base model was trained on.

Conditioning is a tiny fixed "text embedding" per class: ``TOKENS × CONTEXT_DIM`` random vectors
from a fixed seed (no CLIP); class ``NULL`` is the empty prompt used for CFG / cond dropout.
"""
from __future__ import annotations

import torch

from prolora_core.zoo import CLASSES, LATENT_SCALE  # the zoo's prompts and latent format, shared with the demo nodes

SIZE = 8
TOKENS = 4
CONTEXT_DIM = 32
NULL = len(CLASSES)  # index of the empty prompt
COND_SEED = 1234

SRC_PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.75, 0.2], [0.15, 0.25, 0.95], [0.95, 0.85, 0.1]])
SHIFT_PALETTE = torch.tensor([[1.0, 0.55, 0.0], [0.0, 0.9, 0.9], [0.9, 0.1, 0.9], [0.95, 0.95, 0.95]])
STRIPE_COLOR = torch.tensor([1.0, 0.95, 0.2])
STRIPE_PERIOD = 4
STRIPE_STRENGTH = 0.55
RING_COLOR = torch.tensor([0.95, 0.05, 0.05])


def conditioning_table() -> torch.Tensor:
    """``[len(CLASSES) + 1, TOKENS, CONTEXT_DIM]``: one fixed embedding per class, the last = empty prompt."""
    gen = torch.Generator().manual_seed(COND_SEED)
    table = torch.randn(len(CLASSES) + 1, TOKENS, CONTEXT_DIM, generator=gen)
    table[NULL] *= 0.1  # the "empty prompt": small, like an unconditional embedding
    return table


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    return ys + 0.5, xs + 0.5


def stripe_mask() -> torch.Tensor:
    """``[SIZE, SIZE]`` in {0, 1}: diagonal stripes, period :data:`STRIPE_PERIOD` along x + y."""
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return (((xs + ys) % STRIPE_PERIOD) < STRIPE_PERIOD // 2).float()


def _shapes(n: int, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Soft masks ``[n, SIZE, SIZE]`` of a disc / square / bar with random centre and size."""
    ys, xs = _grid()
    cy = 2.5 + 3.0 * torch.rand(n, 1, 1, generator=gen)
    cx = 2.5 + 3.0 * torch.rand(n, 1, 1, generator=gen)
    r = 1.6 + 1.0 * torch.rand(n, 1, 1, generator=gen)
    dy, dx = ys - cy, xs - cx
    disc = ((dy.square() + dx.square()).sqrt() <= r).float()
    square = ((dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)).float()
    horizontal = torch.rand(n, 1, 1, generator=gen) < 0.5
    bar_h = ((dy.abs() <= 0.9) & (dx.abs() <= r + 1.2)).float()
    bar_v = ((dx.abs() <= 0.9) & (dy.abs() <= r + 1.2)).float()
    bar = torch.where(horizontal, bar_h, bar_v)
    c = classes.view(n, 1, 1)
    return torch.where(c == 0, disc, torch.where(c == 1, square, bar))


def _ring(n: int, gen: torch.Generator) -> torch.Tensor:
    ys, xs = _grid()
    cy = 4.0 + torch.randint(-1, 2, (n, 1, 1), generator=gen).float() * 0.5
    cx = 4.0 + torch.randint(-1, 2, (n, 1, 1), generator=gen).float() * 0.5
    d = ((ys - cy).square() + (xs - cx).square()).sqrt()
    return ((d >= 1.4) & (d <= 3.1)).float()


def make_images(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 3, SIZE, SIZE] in [0, 1], class ids [n])`` of family ``kind`` (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "concept":
        bg = 0.65 + 0.25 * torch.rand(n, 3, 1, 1, generator=gen)
        bg = bg * 0.5 + bg.mean(1, keepdim=True) * 0.5
        mask = _ring(n, gen)[:, None]
        img = bg * (1 - mask) + RING_COLOR.view(1, 3, 1, 1) * mask
        return img.clamp(0, 1), torch.full((n,), 3, dtype=torch.long)
    if kind in ("base", "style"):
        classes = torch.randint(0, 3, (n,), generator=gen)
        bg = 0.6 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
        bg = bg * 0.5 + bg.mean(1, keepdim=True) * 0.5  # greyish
        colors = SRC_PALETTE[torch.randint(0, len(SRC_PALETTE), (n,), generator=gen)]
    elif kind == "mixed":  # the gentle descendant's fine-tuning mix: 70 % base, 30 % shifted (per image)
        base_img, base_cls = make_images("base", n, seed)
        sh_img, sh_cls = make_images("shifted", n, seed + 7_777_777)
        pick = torch.rand(n, generator=gen) < 0.3
        return torch.where(pick.view(n, 1, 1, 1), sh_img, base_img), torch.where(pick, sh_cls, base_cls)
    elif kind == "shifted":
        classes = torch.multinomial(torch.tensor([0.25, 0.25, 0.5]), n, replacement=True, generator=gen)
        bg = 0.05 + 0.25 * torch.rand(n, 3, 1, 1, generator=gen)
        colors = SHIFT_PALETTE[torch.randint(0, len(SHIFT_PALETTE), (n,), generator=gen)]
    else:
        raise ValueError(f"unknown data family {kind!r}")
    mask = _shapes(n, classes, gen)[:, None]
    img = bg * (1 - mask) + colors.view(n, 3, 1, 1) * mask
    if kind == "style":
        s = stripe_mask().view(1, 1, SIZE, SIZE) * STRIPE_STRENGTH
        img = img * (1 - s) + STRIPE_COLOR.view(1, 3, 1, 1) * s
    return img.clamp(0, 1), classes


def overlay(kind: str, img: torch.Tensor) -> torch.Tensor:
    """``img`` with the style LoRA's stripes (``kind="style"``) or the concept LoRA's red ring (``"concept"``)
    painted over it: the LoRA's edit applied to images of any domain (for the in-domain measure)."""
    if kind == "style":
        s = stripe_mask().view(1, 1, SIZE, SIZE) * STRIPE_STRENGTH
        return (img * (1 - s) + STRIPE_COLOR.view(1, 3, 1, 1) * s).clamp(0, 1)
    if kind == "concept":
        m = _ring(img.shape[0], torch.Generator().manual_seed(4242))[:, None]
        return (img * (1 - m) + RING_COLOR.view(1, 3, 1, 1) * m).clamp(0, 1)
    raise ValueError(kind)


def domain_pair(lora: str, domain: str, n: int, seed: int, table: torch.Tensor | None = None):
    """``(plain latents, edited latents, contexts)`` of ``domain`` images (same images, same prompts; the
    edited ones carry the LoRA's stripes / ring). Style: the images' own prompts; concept: the ring prompt."""
    img, cls = make_images(domain, n, seed)
    table = conditioning_table() if table is None else table
    ctx = table[cls] if lora == "style" else table[3].expand(n, *table.shape[1:])
    return image_to_latent(img), image_to_latent(overlay(lora, img)), ctx


def image_to_latent(img: torch.Tensor) -> torch.Tensor:
    """Model-space latent ``[n, 4, SIZE, SIZE]``: ``2·rgb − 1`` and a zero 4th channel."""
    return torch.cat([img * 2 - 1, torch.zeros_like(img[:, :1])], dim=1)


def latent_to_image(latent: torch.Tensor, *, comfy_latent: bool = True) -> torch.Tensor:
    """RGB in [0, 1] from a latent; ``comfy_latent``: a sampler's LATENT (÷ scale by process_latent_out)."""
    x = latent * LATENT_SCALE if comfy_latent else latent
    return ((x[:, :3] + 1) / 2).clamp(0, 1)


def make_batch(kind: str, n: int, seed: int, table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0 latents, contexts [n, TOKENS, CONTEXT_DIM], class ids)`` for training/evaluation."""
    img, cls = make_images(kind, n, seed)
    table = conditioning_table() if table is None else table
    return image_to_latent(img), table[cls], cls


# ------------------------------------------------------------------------------------------------
# Detectors on generated images
# ------------------------------------------------------------------------------------------------

def stripe_score(img: torch.Tensor) -> torch.Tensor:
    """Per-image share of the (mean-removed) colour energy at the stripe frequency (all channels).

    The overlay's fundamental lies at spatial frequency (k_y, k_x) = ±(SIZE/STRIPE_PERIOD)·(1, 1) of
    the 2-D FFT; plain shapes put little energy there. In [0, 1]; see the numbers printed by
    ``python -m evidence.data`` for the data families.
    """
    x = img - img.mean(dim=(2, 3), keepdim=True)
    f = torch.fft.fft2(x).abs().square().sum(1)
    k = SIZE // STRIPE_PERIOD
    peak = f[:, k, k] + f[:, -k, -k]
    return peak / f.sum(dim=(1, 2)).clamp_min(1e-8)


def ring_score(img: torch.Tensor) -> torch.Tensor:
    """Per-image red-ring detector: redness (r − (g+b)/2) on the annulus minus redness at the centre."""
    ys, xs = _grid()
    d = ((ys - 4.0).square() + (xs - 4.0).square()).sqrt()
    ring = ((d >= 1.4) & (d <= 3.1)).float()
    centre = (d < 1.1).float()
    red = img[:, 0] - (img[:, 1] + img[:, 2]) / 2
    return (red * ring).sum((1, 2)) / ring.sum() - (red * centre).sum((1, 2)) / centre.sum()


def features(img: torch.Tensor) -> torch.Tensor:
    """Per-image feature vector for sample distances: the mean colour (3 values) and the normalised
    2-D power spectrum of the mean-removed image summed over channels (SIZE² values, shift-invariant:
    texture such as the stripes, blob size, edges). Complements the shift-sensitive pixel MSE."""
    x = img - img.mean(dim=(2, 3), keepdim=True)
    f = torch.fft.fft2(x).abs().square().sum(1).flatten(1)
    return torch.cat([img.mean(dim=(2, 3)), f / f.sum(1, keepdim=True).clamp_min(1e-8)], dim=1)


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean L2 distance between the :func:`features` of paired images (same seeds)."""
    return float((features(a) - features(b)).norm(dim=1).mean())


def background_brightness(img: torch.Tensor) -> torch.Tensor:
    """Mean brightness of the border pixels (source domain ≈0.75, descendant A's domain ≈0.2)."""
    border = torch.ones(SIZE, SIZE, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return img.mean(1)[:, border].mean(1)


if __name__ == "__main__":
    for fam in ("base", "shifted", "mixed", "style", "concept"):
        im, c = make_images(fam, 512, 0)
        print(f"{fam:8s} classes {c.bincount(minlength=4).tolist()}  stripe {stripe_score(im).mean():.3f}  "
              f"ring {ring_score(im).mean():.3f}  background {background_brightness(im).mean():.2f}")
