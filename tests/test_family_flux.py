"""Flux.1 and Chroma through the nodes (Compute Basis → Match Modules → Project LoRA), on tiny models
built from ComfyUI's own classes (``supported_models.Flux`` / ``Chroma``, tests/comfy_host.py).

LoRA layouts people publish for Flux:

* diffusers/PEFT (ai-toolkit, SimpleTuner): ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``,
  separate q/k/v that ComfyUI applies to row slices of the fused ``img_attn.qkv`` / single-block
  ``linear1`` weights, ``proj_mlp`` on the last rows of ``linear1``, ``norm1.linear`` on ``img_mod.lin``,
  ``norm_out.linear`` on ``final_layer.adaLN_modulation.1`` with its row halves swapped, no alpha;
* kohya fused: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1`` on
  whole weights, with alpha;
* OneTrainer: the diffusers modules spelled ``lora_transformer_transformer_blocks_0_attn_to_q``, with alpha.

Each: ``copy`` output applied by ComfyUI changes the target exactly as the input file does;
``prolora-full`` with target = source gives the input's change back; on a perturbed target every
module (every slice on its own) matches the dense float64 reference (tests/reference.py) computed
with the bases of that slice. A Chroma-like target has no modulation layers: those are reported
"not in target" and the rest transfers.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

import comfy_host
from reference import phi, reference_transfer, top_bases

PREFIX_D, PREFIX_S = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
DIFFUSERS = [
    PREFIX_D + "attn.to_q", PREFIX_D + "attn.to_k", PREFIX_D + "attn.to_v", PREFIX_D + "attn.add_k_proj",
    PREFIX_D + "attn.to_out.0", PREFIX_D + "ff.net.0.proj", PREFIX_D + "norm1.linear",
    PREFIX_S + "attn.to_q", PREFIX_S + "attn.to_k", PREFIX_S + "attn.to_v", PREFIX_S + "proj_mlp",
    PREFIX_S + "norm.linear", PREFIX_S + "proj_out", "transformer.norm_out.linear",
]
KOHYA = [
    "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_mod_lin",
    "lora_unet_single_blocks_0_modulation_lin", "lora_unet_double_blocks_0_txt_mlp_0",
]
#: OneTrainer: the diffusers modules in kohya spelling (``lora_transformer_`` + underscores), with alpha.
ONETRAINER = ["lora_transformer_" + n.removeprefix("transformer.").replace(".", "_") for n in DIFFUSERS]
LAYOUTS = {"diffusers": DIFFUSERS, "kohya": KOHYA, "onetrainer": ONETRAINER}
MODULATION_D = {PREFIX_D + "norm1.linear", PREFIX_S + "norm.linear", "transformer.norm_out.linear"}
RANK, KOHYA_ALPHA = 4, 2.0


# --------------------------------------------------------------------------------------
# Places (from ComfyUI's own key map), LoRAs, ComfyUI's application
# --------------------------------------------------------------------------------------

Place = tuple[str, "tuple[int, int, int] | None", bool]


def places(model: Any) -> dict[str, Place]:
    """LoRA module name → (weight key, row slice or None, halves swapped), as
    ``comfy.lora.model_lora_keys_unet`` says (``swap_scale_shift`` is the one function it applies)."""
    import comfy.lora
    import comfy.utils

    out: dict[str, Place] = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if isinstance(target, str):
            out[name] = (target, None, False)
        elif len(target) == 2:
            out[name] = (target[0], None if target[1] is None else tuple(target[1]), False)
        elif target[1] is None and target[2] is comfy.utils.swap_scale_shift:
            out[name] = (target[0], None, True)
    return out


def view(w: Any, place: Place) -> Any:
    """The part of a whole weight (or weight change) a module sits on, in the LoRA's own row order:
    the slice's rows, or the two row halves swapped (an involution, so it also maps back)."""
    _, offset, swapped = place
    if offset is not None:
        return w[offset[1]:offset[1] + offset[2]]
    if swapped:
        h = w.shape[0] // 2
        return np.concatenate([w[h:], w[:h]]) if isinstance(w, np.ndarray) else torch.cat([w[h:], w[:h]])
    return w


def module_shape(model: Any, name: str) -> tuple[int, int]:
    place = places(model)[name]
    return tuple(view(model.model.state_dict()[place[0]], place).shape)  # type: ignore[return-value]


def make_lora(model: Any, layout: str, seed: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random factors on the layout's modules: PEFT ``lora_A``/``lora_B`` without alpha (diffusers),
    or kohya ``lora_down``/``lora_up`` with alpha."""
    return comfy_host.factor_lora({name: module_shape(model, name) for name in LAYOUTS[layout]}, peft=layout == "diffusers", rank=RANK,
                                  alpha=KOHYA_ALPHA, scale=scale, seed=seed)


def dense(lora: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """The module's ΔW in float64 (numpy), scale alpha/r (1 without alpha)."""
    return comfy_host.lora_delta(lora, name, KOHYA_ALPHA / RANK)


applied = comfy_host.applied_by_comfyui


_run = comfy_host.run_node


def transfer(nodes_by_id: dict[str, Any], src: Any, tgt: Any, lora: dict, mode: str) -> tuple[dict, str, str]:
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, subspace_rank=0, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode=mode, out_rank=0, rescale_to_source_norm=False)
    return out, summary, report


def default_k(m: int, n: int) -> int:
    return min(64, min(m, n) // 4)


def no_key_warnings(caplog: pytest.LogCaptureFixture) -> None:
    missed = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not missed, missed[:5]


@pytest.fixture(scope="module")
def flux_pair(comfyui: Any) -> tuple[Any, Any]:
    src = comfy_host.tiny_flux_model(0)
    return src, comfy_host.perturbed_copy(src, 0.05, seed=11)


# --------------------------------------------------------------------------------------
# Flux → Flux
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["diffusers", "kohya", "onetrainer"])
def test_copy_output_applies_in_comfyui_exactly_as_the_input(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any], layout: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = flux_pair
    lora = make_lora(src, layout)
    out, summary, report = transfer(nodes_by_id, src, tgt, lora, "copy")
    n = len(LAYOUTS[layout])
    assert f"{n}/{n} modules transferred" in report, report
    if layout == "diffusers":  # a slice has no native name: the LoRA's own module names come back
        assert {PREFIX_D + "attn.to_q.lora_up.weight", PREFIX_S + "proj_mlp.lora_down.weight"} <= set(out), sorted(out)[:6]
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, out)
    no_key_warnings(caplog)
    before = comfy_host.unet_weights(tgt)
    changed = {k for k in before if not torch.equal(before[k], want[k])}
    assert changed == {k for k in before if not torch.equal(before[k], got[k])}
    assert len(changed) == (5 if layout == "kohya" else 9)
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_target_equal_to_source_gives_the_input_back(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any], layout: str) -> None:
    src, _ = flux_pair
    lora = make_lora(src, layout, seed=2)
    out, summary, _ = transfer(nodes_by_id, src, src, lora, "prolora-full")
    comfy_host.assert_same_change(comfy_host.unet_weights(src), applied(src, lora), applied(src, out))


@pytest.mark.parametrize("mode", ["prolora-full", "prolora", "subspace"])
@pytest.mark.parametrize("layout", ["diffusers", "kohya", "onetrainer"])
def test_each_slice_matches_the_dense_reference_with_its_own_bases(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any],
                                                                   layout: str, mode: str) -> None:
    src, tgt = flux_pair
    lora = make_lora(src, layout, seed=3)
    out, _, _ = transfer(nodes_by_id, src, tgt, lora, mode)
    before, after = comfy_host.unet_weights(tgt), applied(tgt, out)
    src_sd = comfy_host.unet_weights(src)
    covered: dict[str, np.ndarray] = {}
    for name in LAYOUTS[layout]:
        place = places(src)[name]
        key, offset, _ = place
        ws, wt = view(src_sd[key].double().numpy(), place), view(before[key].double().numpy(), place)
        delta = dense(lora, name)
        expected = reference_transfer(delta, ws, wt, default_k(*delta.shape), mode)
        got = view((after[key] - before[key]).double().numpy(), place)
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected), (name, mode)
        mask = covered.setdefault(key, np.zeros(before[key].shape[0], dtype=bool))
        mask[slice(offset[1], offset[1] + offset[2]) if offset else slice(None)] = True
    for key, mask in covered.items():  # rows no module sits on stay as they were
        assert torch.equal(after[key][torch.from_numpy(~mask)], before[key][torch.from_numpy(~mask)]), key


def test_slice_bases_against_whole_weight_bases(flux_pair: tuple[Any, Any]) -> None:
    """The measurement behind projecting a slice with its own bases (README, "Flux.1 and Chroma").

    For each diffusers module on a slice of a fused weight (q/k/v of ``img_attn.qkv``, q/k/v/proj_mlp
    of ``linear1``), ``prolora-full`` with (a) the slice's bases, (b) the whole weight's bases (the
    update zero-padded to the whole weight): Φ of the two subspace pairs, the norm ratio, and the
    share of the projected update that (b) moves outside the slice's rows (a ``to_q`` LoRA cannot
    carry it: ComfyUI writes it into the q rows only). Printed with ``-s``.
    """
    src, tgt = flux_pair
    lora = make_lora(src, "diffusers", seed=4)
    leaks = []
    for eps, target in ((0.05, tgt), (0.2, comfy_host.perturbed_copy(src, 0.2, seed=13))):
        print(f"target = source + {eps:.0%} noise")
        leaks += _slice_against_whole(lora, comfy_host.unet_weights(src), comfy_host.unet_weights(target), places(src))
    assert len(leaks) == 16 and min(leaks) > 1e-4


def _slice_against_whole(lora: dict[str, torch.Tensor], src_sd: dict[str, torch.Tensor], tgt_sd: dict[str, torch.Tensor],
                         where: dict[str, Place]) -> list[float]:
    leaks = []
    for name in DIFFUSERS:
        key, offset, _ = where[name]
        if offset is None:
            continue
        rows = slice(offset[1], offset[1] + offset[2])
        ws, wt = src_sd[key].double().numpy(), tgt_sd[key].double().numpy()
        delta = dense(lora, name)
        k_s, k_w = default_k(*delta.shape), default_k(*ws.shape)
        by_slice = reference_transfer(delta, ws[rows], wt[rows], k_s, "prolora-full")
        padded = np.zeros_like(ws)
        padded[rows] = delta
        by_whole = reference_transfer(padded, ws, wt, k_w, "prolora-full")
        leak = float(np.linalg.norm(np.delete(by_whole, np.r_[rows], axis=0)) ** 2 / np.linalg.norm(by_whole) ** 2)
        us, vs = top_bases(ws[rows], k_s)
        ut, vt = top_bases(wt[rows], k_s)
        uws, vws = top_bases(ws, k_w)
        uwt, vwt = top_bases(wt, k_w)
        dn = np.linalg.norm(delta)
        print(f"  {name.removeprefix('transformer.')}: slice Φ_U {phi(us, ut):.3f} Φ_V {phi(vs, vt):.3f} norm ratio "
              f"{np.linalg.norm(by_slice) / dn:.3f} | whole Φ_U {phi(uws, uwt):.3f} Φ_V {phi(vws, vwt):.3f} norm ratio "
              f"{np.linalg.norm(by_whole) / dn:.3f}, outside the slice {leak:.3%}; on the slice rows the two differ by "
              f"{np.linalg.norm(by_whole[rows] - by_slice) / np.linalg.norm(by_slice):.1%}")
        leaks.append(leak)
    return leaks


# --------------------------------------------------------------------------------------
# Flux → Chroma: no modulation layers in the target
# --------------------------------------------------------------------------------------

def test_chroma_target_reports_modulation_layers_not_in_target_and_transfers_the_rest(nodes_by_id: dict[str, Any],
                                                                                      flux_pair: tuple[Any, Any],
                                                                                      caplog: pytest.LogCaptureFixture) -> None:
    src, _ = flux_pair
    chroma = comfy_host.tiny_chroma_from(src, 0.05, seed=12)
    assert "diffusion_model.double_blocks.0.img_mod.lin.weight" not in chroma.model.state_dict()
    lora = make_lora(src, "diffusers", seed=5)
    out, summary, report = transfer(nodes_by_id, src, chroma, lora, "prolora-full")
    assert "modulation layers (3): transferred 0, not in target 3" in summary, summary
    assert "modulation layers (3): transferred 0, not in target 3" in report, report
    assert f"{len(DIFFUSERS) - 3}/{len(DIFFUSERS)} modules transferred" in report, report
    assert not any(n in k for k in out for n in MODULATION_D), sorted(out)
    with caplog.at_level(logging.WARNING):
        after = applied(chroma, out)
    no_key_warnings(caplog)
    before, src_sd = comfy_host.unet_weights(chroma), comfy_host.unet_weights(src)
    for name in DIFFUSERS:
        if name in MODULATION_D:
            continue
        place = places(src)[name]
        key = place[0]
        delta = dense(lora, name)
        expected = reference_transfer(delta, view(src_sd[key].double().numpy(), place), view(before[key].double().numpy(), place),
                                      default_k(*delta.shape), "prolora-full")
        got = view((after[key] - before[key]).double().numpy(), place)
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected), name


# --------------------------------------------------------------------------------------
# The files node: ComfyUI's key map from a real model object on the meta device
# --------------------------------------------------------------------------------------

def test_files_node_transfers_a_diffusers_flux_lora_on_slices(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any], comfy_dirs: Any,
                                                               tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    import folder_paths
    from safetensors.torch import load_file, save_file

    src, tgt = flux_pair
    models = tmp_path / "models"
    comfy_host.save_model_state(src, models / "diffusion_models" / "flux_src.safetensors")
    comfy_host.save_model_state(tgt, models / "diffusion_models" / "flux_tgt.safetensors")
    lora = make_lora(src, "diffusers", seed=6)
    (models / "loras").mkdir(parents=True)
    save_file(lora, str(models / "loras" / "flux_style.safetensors"))
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    try:
        names, report = _run(nodes_by_id, "ProLoRATransferLoRAFiles", source_model="diffusion_models/flux_src.safetensors",
                             target_model="diffusion_models/flux_tgt.safetensors", lora_name="flux_style.safetensors", more_loras="",
                             mode="copy", subspace_rank=0, threshold=0.0, pairing="name", filename_pattern="{lora}__to_{target}",
                             device="cpu")
    finally:
        for folder in ("diffusion_models", "loras"):
            folder_paths.folder_names_and_paths[folder][0].remove(str(models / folder))
    assert f"flux_style.safetensors: {len(DIFFUSERS)} modules\n  {len(DIFFUSERS)} transferred" in report, report
    assert names.strip() == "flux_style__to_flux_tgt.safetensors", names
    out = load_file(str(models / "loras" / names.strip()))
    assert {PREFIX_D + "attn.to_q.lora_up.weight", PREFIX_S + "proj_mlp.lora_down.weight"} <= set(out), sorted(out)[:6]
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, out)
    no_key_warnings(caplog)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Slices in the core, the basis cache, similarity pairing
# --------------------------------------------------------------------------------------

def comfy_swap() -> Any:
    import comfy.utils

    return comfy.utils.swap_scale_shift


def test_a_slice_is_a_weight_of_its_own(comfyui: Any) -> None:
    from prolora_core.errors import ProLoRAError
    from prolora_core.slices import SlicedWeights, WeightSlice, place_key
    from prolora_core.weights import content_key_of_tensor

    class Dict:  # a WeightSource over an in-memory dict (the slice wrapper is what is tested)
        label = "dict"

        def __init__(self, sd: dict[str, torch.Tensor]) -> None:
            self.sd = sd

        def keys(self) -> list[str]:
            return list(self.sd)

        def shape(self, key: str) -> tuple[int, ...]:
            return tuple(self.sd[key].shape)

        def get(self, key: str) -> torch.Tensor:
            return self.sd[key]

        def content_key(self, key: str) -> str:
            return content_key_of_tensor(self.sd[key])

    qkv = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    w = SlicedWeights(Dict({"b.qkv.weight": qkv, "a.q.weight": qkv[4:8].clone()}))
    k = place_key(("b.qkv.weight", (0, 4, 4)))
    assert k == "b.qkv.weight[0:4:4]" and WeightSlice.parse(k) == WeightSlice("b.qkv.weight", 0, 4, 4)
    assert place_key("a.q.weight") == "a.q.weight" and place_key(("a.q.weight", None)) == "a.q.weight"
    assert place_key(("b.qkv.weight", None, lambda t: t)) is None  # a function on the update: not served
    swap = comfy_swap()
    assert place_key(("b.qkv.weight", None, swap), swap) == "b.qkv.weight[swap]"
    assert torch.equal(w.get("b.qkv.weight[swap]"), swap(qkv)) and w.shape("b.qkv.weight[swap]") == (12, 4)
    assert w.shape(k) == (4, 4) and torch.equal(w.get(k), qkv[4:8]) and w.keys() == ["b.qkv.weight", "a.q.weight"]
    assert w.content_key(k) == w.content_key("a.q.weight") != w.content_key("b.qkv.weight[0:0:4]")  # keyed by content
    assert w.has(k) and not w.has("b.qkv.weight[0:10:4]") and not w.has("c.weight[0:0:1]")
    with pytest.raises(ProLoRAError, match="does not fit the weight"):
        w.get("b.qkv.weight[0:10:4]")
    assert w.shape("b.qkv.weight[1:1:2]") == (12, 2)


def test_slice_bases_come_from_the_cache_on_a_second_run_and_similarity_pairing_keeps_slices(
        nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src, tgt = flux_pair
    lora = make_lora(src, "diffusers", seed=7)
    summaries = []
    for pairing in ("name", "name", "similarity"):
        (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, subspace_rank=0, device="cpu", use_cache=True)
        (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, subspace_rank=0, device="cpu", use_cache=True)
        match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing=pairing)
        summaries.append((match, summary))
    n = 2 * len(DIFFUSERS)  # one basis per module on each side: every slice is a weight of its own
    assert f"bases computed: {n}, from cache: 0" in summaries[0][1], summaries[0][1]
    assert f"bases computed: 0, from cache: {n}" in summaries[1][1], summaries[1][1]
    rows = {r["source"]: r["target"] for r in summaries[2][0].rows()}
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert rows[f"{qkv}[0:0:64]"] == f"{qkv}[0:0:64]" and rows[f"{qkv}[0:128:64]"] == f"{qkv}[0:128:64]"


def test_dora_magnitude_on_a_slice_follows_the_slice(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any]) -> None:
    """A DoRA magnitude on ``to_q`` and ``proj_mlp`` (rows of fused weights): ComfyUI normalises the
    slice it applies to, so the ratio rule reads the slice's rows. ``copy`` and target = source
    give ComfyUI's own result back."""
    src, tgt = flux_pair
    lora = make_lora(src, "diffusers", seed=8)
    gen = torch.Generator().manual_seed(9)
    for name in (PREFIX_D + "attn.to_q", PREFIX_S + "proj_mlp"):
        w = view(src.model.state_dict()[places(src)[name][0]], places(src)[name])
        lora[f"{name}.dora_scale"] = (w.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.randn(w.shape[0], 1, generator=gen))).contiguous()
    for model, mode in ((tgt, "copy"), (src, "prolora-full")):
        out, _, report = transfer(nodes_by_id, src, model, lora, mode)
        assert f"{len(DIFFUSERS)}/{len(DIFFUSERS)} modules transferred" in report, report
        comfy_host.assert_same_change(comfy_host.unet_weights(model), applied(model, lora), applied(model, out))
