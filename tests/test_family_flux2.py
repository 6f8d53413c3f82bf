"""FLUX.2 (Klein) and SimpleTuner's Flux layouts, on tiny models built from ComfyUI 0.3.75's own
classes (``supported_models.Flux2`` → ``model_base.Flux2``, tests/family_models.py).

FLUX.2 Klein base → distilled (the same config), through the nodes (Compute Basis → Match Modules →
Project LoRA), the files node and the CLI. LoRA layouts, each placed by ComfyUI's own key map
(``comfy.lora.model_lora_keys_unet``; ``model_base.Flux2`` is a ``model_base.Flux``, so the Flux
branch applies):

* BFL names with PEFT factors, the layout most Klein LoRAs are published in (ai-toolkit, ComfyUI
  trainers): ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, on whole fused weights;
* kohya: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``, and FLUX.2's
  shared modulation layers ``lora_unet_double_stream_modulation_img_lin`` /
  ``lora_unet_single_stream_modulation_lin`` (reported as the modulation group);
* diffusers names ComfyUI 0.3.75 maps for FLUX.2 through its Flux.1 table (``comfy.utils.flux_to_diffusers``):
  ``transformer.transformer_blocks.0.attn.to_q`` … on row slices of ``img_attn.qkv`` / ``txt_attn.qkv``,
  single-block ``attn.to_q/to_k/to_v`` on rows ``0:3h`` of ``linear1``, ``attn.to_out.0``, ``attn.to_add_out``,
  ``norm_out.linear`` on ``final_layer.adaLN_modulation.1`` with its row halves swapped;
* diffusers' own FLUX.2 names for the MLPs and the single block's fused projection
  (``ff.linear_in``, ``ff.linear_out``, ``attn.to_qkv_mlp_proj``, single-block ``attn.to_out``) are in
  no ComfyUI 0.3.75 key map: ComfyUI loads none of them, and the pack reports each (it transfers the
  rest, or refuses a LoRA made only of them).

Each: ``copy`` output applied by ComfyUI changes the target exactly as the input file does;
``prolora-full`` with target = source gives the input's change back; on a perturbed target every
module (every slice on its own rows) matches the dense float64 reference (tests/reference.py).

Shapes that cannot match: Klein 4B ↔ 9B and Flux.1 → FLUX.2 through the nodes (one message naming
both models and sizes), and on files with the real key layout at real size: ComfyUI 0.3.75's
detection reads FLUX.2 with FLUX.2-dev's 48 heads of 128, so it builds FLUX.2-dev (hidden 6144) but
cannot build a Klein model (hidden 3072 or 4096) at all; the pack says so, naming the file.

SimpleTuner (Flux.1): its ``lycoris_`` names (``lycoris_transformer_blocks_0_attn_to_q``), which
ComfyUI maps, transfer with parity; with ``--fuse_qkv_projections`` it trains diffusers' fused
``attn.to_qkv`` / ``attn.to_added_qkv`` (double blocks) and ``attn.to_qkv`` (single blocks), which no
ComfyUI 0.3.75 key map places: ComfyUI drops them with "lora key not loaded", and the pack names
each of them in its reports instead of dropping them silently.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy_host
import family_models as fm
import numpy as np
import pytest
import torch
from fixtures_files import run_main
from reference import reference_transfer
from safetensors.torch import load_file, save_file
from test_family_flux import places, view

RANK, ALPHA = 4, 2.0
D, S = "diffusion_model.double_blocks.0.", "diffusion_model.single_blocks.0."
BFL = [D + "img_attn.qkv", D + "txt_attn.qkv", D + "img_attn.proj", D + "txt_attn.proj", D + "img_mlp.0", D + "img_mlp.2",
       D + "txt_mlp.0", S + "linear1", S + "linear2"]
TD, TS = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
#: layout → (family, LoRA module names, PEFT lora_A/lora_B without alpha?)
LAYOUTS: dict[str, tuple[str, list[str], bool]] = {
    "flux2-bfl-peft": ("flux2_klein4b", BFL, True),
    "flux2-kohya": ("flux2_klein4b", ["lora_unet_" + n.removeprefix("diffusion_model.").replace(".", "_") for n in BFL]
                    + ["lora_unet_double_stream_modulation_img_lin", "lora_unet_double_stream_modulation_txt_lin",
                       "lora_unet_single_stream_modulation_lin"], False),
    "flux2-diffusers": ("flux2_klein4b", [TD + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                                           "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out")]
                        + [TS + m for m in ("attn.to_q", "attn.to_k", "attn.to_v")] + ["transformer.norm_out.linear"], True),
    # SimpleTuner's LyCORIS naming of the Flux.1 diffusers modules (lora_down/lora_up + alpha)
    "simpletuner-lycoris": ("flux", ["lycoris_" + n.removeprefix("transformer.").replace(".", "_") for n in (
        TD + "attn.to_q", TD + "attn.to_k", TD + "attn.to_v", TD + "attn.add_q_proj", TD + "attn.to_out.0", TD + "ff.net.0.proj",
        TS + "attn.to_q", TS + "proj_mlp", TS + "proj_out")], False),
}
#: diffusers' FLUX.2 module names that ComfyUI 0.3.75 does not map, with their (out, in) in hidden units h.
FLUX2_DIFFUSERS_UNMAPPED = {TD + "ff.linear_in": (6, 1), TD + "ff.linear_out": (1, 3), TD + "ff_context.linear_in": (6, 1),
                            TS + "attn.to_qkv_mlp_proj": (9, 1), TS + "attn.to_out": (1, 4)}
#: SimpleTuner with fused QKV projections: diffusers' fused modules, (out, in) in hidden units.
SIMPLETUNER_FUSED = {TD + "attn.to_qkv": (3, 1), TD + "attn.to_added_qkv": (3, 1), TS + "attn.to_qkv": (3, 1)}
SIMPLETUNER_MAPPED = [TD + "attn.to_out.0", TD + "attn.to_add_out", TS + "proj_mlp", TS + "proj_out"]


# --------------------------------------------------------------------------------------
# Models, LoRAs, ComfyUI's application, the nodes
# --------------------------------------------------------------------------------------

def build(family: str, seed: int = 0) -> Any:
    return comfy_host.tiny_flux_model(seed) if family == "flux" else fm.tiny_model(family, seed)


@pytest.fixture(scope="module")
def pair(comfyui: Any) -> Iterator[Any]:
    """``pair(family)``: the tiny model and a fine-tuned-like descendant (+5 % noise), built once."""
    built: dict[str, tuple[Any, Any]] = {}

    def get(family: str) -> tuple[Any, Any]:
        if family not in built:
            src = build(family)
            built[family] = (src, fm.descendant(src, 0.05, seed=11))
        return built[family]

    yield get
    built.clear()


def module_shape(model: Any, name: str) -> tuple[int, int]:
    where = places(model)[name]
    return tuple(view(model.model.state_dict()[where[0]], where).shape)  # type: ignore[return-value]


def make_lora(model: Any, layout: str, seed: int = 1) -> dict[str, torch.Tensor]:
    _, names, peft = LAYOUTS[layout]
    return comfy_host.factor_lora({n: module_shape(model, n) for n in names}, peft=peft, rank=RANK, alpha=ALPHA, seed=seed)


def hidden_lora(model: Any, modules: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """PEFT factors on modules ComfyUI does not place, shaped in units of the model's hidden size."""
    h = model.model.model_config.unet_config["hidden_size"]
    return comfy_host.factor_lora({n: (a * h, b * h) for n, (a, b) in modules.items()}, peft=True, rank=RANK, alpha=ALPHA, seed=seed)


def dense(lora: dict[str, torch.Tensor], name: str) -> np.ndarray:
    return comfy_host.lora_delta(lora, name, ALPHA / RANK)


applied = comfy_host.applied_by_comfyui
_run = comfy_host.run_node


basis, project, transfer, default_k = comfy_host.node_basis, comfy_host.node_project, comfy_host.node_transfer, comfy_host.default_k


def not_loaded(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]


def raises_prolora(match: str) -> Any:
    """The pack's ProLoRAError (imported under ComfyUI's module name: matched by class name)."""
    return pytest.raises(Exception, match=match)


def check_against_reference(lora: dict, names: list[str], src: Any, tgt: Any, out: dict, mode: str) -> None:
    """Each module's change of ``tgt`` under ComfyUI's loader equals the dense float64 reference with
    the bases of the weight or slice it sits on; rows and weights no module sits on stay as they were."""
    before, after, src_sd = comfy_host.unet_weights(tgt), applied(tgt, out), comfy_host.unet_weights(src)
    covered: dict[str, np.ndarray] = {}
    for name in names:
        where = places(src)[name]
        key, offset, _ = where
        delta = dense(lora, name)
        want = reference_transfer(delta, view(src_sd[key].double().numpy(), where), view(before[key].double().numpy(), where),
                                  default_k(*delta.shape), mode)
        got = view((after[key] - before[key]).double().numpy(), where)
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), (name, mode)
        mask = covered.setdefault(key, np.zeros(before[key].shape[0], dtype=bool))
        mask[slice(offset[1], offset[1] + offset[2]) if offset else slice(None)] = True
    for key in before:
        rest = torch.from_numpy(~covered[key]) if key in covered else slice(None)
        assert torch.equal(after[key][rest], before[key][rest]), key


# --------------------------------------------------------------------------------------
# The host builds FLUX.2 from its own class, and maps it with the Flux branch
# --------------------------------------------------------------------------------------

def test_the_tiny_flux2_is_comfyuis_flux2_with_its_layout(pair: Any) -> None:
    import comfy.model_base

    src, _ = pair("flux2_klein4b")
    assert type(src.model) is comfy.model_base.Flux2 and type(src.model.model_config).__name__ == "Flux2"
    sd, h = src.model.state_dict(), 64
    shapes = {k: tuple(sd["diffusion_model." + k].shape) for k in (
        "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear1.weight",
        "double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight")}
    assert shapes == {"double_blocks.0.img_attn.qkv.weight": (3 * h, h), "double_blocks.0.img_mlp.0.weight": (6 * h, h),
                      "single_blocks.0.linear1.weight": (9 * h, h), "double_stream_modulation_img.lin.weight": (6 * h, h),
                      "single_stream_modulation.lin.weight": (3 * h, h)}
    assert not any(".img_mod." in k or ".modulation.lin." in k or k.endswith(".bias") for k in sd if k.startswith("diffusion_model."))
    where = places(src)
    assert where[TS + "attn.to_v"] == (S + "linear1.weight", (0, 2 * h, h), False)
    # ComfyUI's Flux.1 table puts a ``proj_mlp`` on rows 3h:7h; FLUX.2's MLP input is rows 3h:9h
    assert where[TS + "proj_mlp"] == (S + "linear1.weight", (0, 3 * h, 4 * h), False)
    assert not set(FLUX2_DIFFUSERS_UNMAPPED) & set(where)


# --------------------------------------------------------------------------------------
# Each layout: copy parity, identity, the dense reference
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_copy_output_applies_in_comfyui_exactly_as_the_input(nodes_by_id: dict[str, Any], pair: Any, layout: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    family, names, _ = LAYOUTS[layout]
    src, tgt = pair(family)
    lora = make_lora(src, layout)
    out, _, report = transfer(nodes_by_id, src, tgt, lora, "copy")
    n = len(names)
    assert f"{n}/{n} modules transferred" in report, report
    if layout == "flux2-kohya":  # FLUX.2's shared modulation layers are their own group
        assert "modulation layers (3): transferred 3, not in target 0" in report, report
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, out)
    assert not not_loaded(caplog)
    before = comfy_host.unet_weights(tgt)
    changed = {k for k in before if not torch.equal(before[k], want[k])}
    assert changed == {k for k in before if not torch.equal(before[k], got[k])} == {places(src)[m][0] for m in names}
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_target_equal_to_source_gives_the_input_back(nodes_by_id: dict[str, Any], pair: Any, layout: str) -> None:
    src, _ = pair(LAYOUTS[layout][0])
    lora = make_lora(src, layout, seed=2)
    out, _, _ = transfer(nodes_by_id, src, src, lora, "prolora-full")
    comfy_host.assert_same_change(comfy_host.unet_weights(src), applied(src, lora), applied(src, out))


@pytest.mark.parametrize("mode", ["prolora-full", "prolora", "subspace"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_module_matches_the_dense_reference(nodes_by_id: dict[str, Any], pair: Any, layout: str, mode: str) -> None:
    family, names, _ = LAYOUTS[layout]
    src, tgt = pair(family)
    lora = make_lora(src, layout, seed=3)
    out, _, _ = transfer(nodes_by_id, src, tgt, lora, mode)
    check_against_reference(lora, names, src, tgt, out, mode)


def test_bfl_lokr_on_fused_weights_copy_and_identity(nodes_by_id: dict[str, Any], pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    """LyCORIS LoKr under BFL names (``diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1`` /
    ``lokr_w2``, another layout Klein LoRAs are shared in): ``copy`` applies in ComfyUI as the input
    does, and ``prolora-full`` with target = source gives the input's change back up to the dense
    re-factoring of a LoKr (the smallest rank keeping 99.9 % of Σσ², so within √0.001 ≈ 3.2 % of the
    change's norm: README, honest limits)."""
    src, tgt = pair("flux2_klein4b")
    gen = torch.Generator().manual_seed(13)
    factors = {D + "img_attn.qkv": ((4, 4), (48, 16)), S + "linear1": ((8, 8), (72, 8)), D + "img_mlp.2": ((4, 4), (16, 48))}
    lora: dict[str, torch.Tensor] = {}
    for name, (w1, w2) in factors.items():
        assert (w1[0] * w2[0], w1[1] * w2[1]) == module_shape(src, name), name
        lora[f"{name}.lokr_w1"], lora[f"{name}.lokr_w2"] = 0.1 * torch.randn(w1, generator=gen), 0.1 * torch.randn(w2, generator=gen)
    for model, mode in ((tgt, "copy"), (src, "prolora-full")):
        out, _, report = transfer(nodes_by_id, src, model, lora, mode)
        assert f"{len(factors)}/{len(factors)} modules transferred" in report, report
        with caplog.at_level(logging.WARNING):
            want, got = applied(model, lora), applied(model, out)
        assert not not_loaded(caplog)
        comfy_host.assert_same_change(comfy_host.unet_weights(model), want, got, rel=1e-5 if mode == "copy" else 0.001 ** 0.5)


# --------------------------------------------------------------------------------------
# Names ComfyUI 0.3.75 does not map: reported, never dropped silently
# --------------------------------------------------------------------------------------

UNPLACED = {"flux2-diffusers-own": ("flux2_klein4b", FLUX2_DIFFUSERS_UNMAPPED, "Flux2"),
            "simpletuner-fused": ("flux", SIMPLETUNER_FUSED, "Flux")}


@pytest.mark.parametrize("case", list(UNPLACED))
def test_modules_comfyui_does_not_map_are_reported_and_the_rest_transfers(nodes_by_id: dict[str, Any], pair: Any, case: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A LoRA with modules ComfyUI 0.3.75 places (diffusers ``attn.to_out.0`` …) and modules it does
    not (FLUX.2's ``ff.linear_in``, ``attn.to_qkv_mlp_proj``; SimpleTuner's fused ``attn.to_qkv``):
    ComfyUI applies the first and logs every tensor of the others as not loaded; the pack transfers
    the first (``copy``: the same change as the input file) and names each of the others in Match
    Modules' summary and Project LoRA's report."""
    family, unplaced, kind = UNPLACED[case]
    src, tgt = pair(family)
    mapped = [TD + "attn.to_q", TD + "attn.to_out.0"] if family != "flux" else SIMPLETUNER_MAPPED
    lora = {**comfy_host.factor_lora({n: module_shape(src, n) for n in mapped}, peft=True, rank=RANK, alpha=ALPHA, seed=4),
            **hidden_lora(src, unplaced, seed=5)}
    with caplog.at_level(logging.WARNING):
        want = applied(tgt, lora)
    missed = not_loaded(caplog)
    assert len(missed) == 2 * len(unplaced) and all(any(n in m for m in missed) for n in unplaced), missed
    caplog.clear()
    out, summary, report = transfer(nodes_by_id, src, tgt, lora, "copy")
    assert f"LoRA modules with no weight in the source model ({len(unplaced)})" in summary, summary
    assert f"{len(mapped)}/{len(mapped)} modules transferred; unmapped: {len(unplaced)}" in report, report
    for n in unplaced:
        assert n in summary and f"{n}.*: no entry in ComfyUI's LoRA key map for this model: ComfyUI would not apply it either" in report, n
        assert not any(k.startswith(n + ".") for k in out), n
    with caplog.at_level(logging.WARNING):
        got = applied(tgt, out)
    assert not not_loaded(caplog)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    only = hidden_lora(src, unplaced, seed=6)  # nothing ComfyUI places: refused, naming the model
    with raises_prolora(rf"none of the LoRA's {len(unplaced)} modules maps onto the source model \({kind}\)") as info:
        transfer(nodes_by_id, src, tgt, only, "copy")
    assert type(info.value).__name__ == "ProLoRAError"


# --------------------------------------------------------------------------------------
# Klein base → distilled from files: the CLI and the files node
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def klein_files(pair: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny Klein-like base and its descendant as bare diffusion-model files (FLUX.2's key names,
    the tiny-model metadata carrying their config), a BFL-PEFT LoRA and a diffusers one."""
    root = tmp_path_factory.mktemp("klein")
    src, tgt = pair("flux2_klein4b")
    paths = {"src": comfy_host.save_model_state(src, root / "diffusion_models" / "klein_base.safetensors", prefix=""),
             "tgt": comfy_host.save_model_state(tgt, root / "diffusion_models" / "klein_distilled.safetensors", prefix="")}
    (root / "loras").mkdir()
    loras = {}
    for layout in ("flux2-bfl-peft", "flux2-diffusers"):
        loras[layout] = make_lora(src, layout, seed=7)
        save_file(loras[layout], str(root / "loras" / f"{layout}.safetensors"))
    return {"root": root, "src": src, "tgt": tgt, "paths": paths, "loras": loras}


@pytest.mark.parametrize("layout", ["flux2-bfl-peft", "flux2-diffusers"])
def test_cli_klein_base_to_distilled(klein_files: dict, layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     caplog: pytest.LogCaptureFixture) -> None:
    """``copy`` parity with ComfyUI's loader, and ``prolora-full`` against the dense reference, both
    through ComfyUI's key map for the detected ``Flux2``."""
    p, lora, n = klein_files["paths"], klein_files["loras"][layout], len(LAYOUTS[layout][1])
    lora_path = klein_files["root"] / "loras" / f"{layout}.safetensors"
    for mode in ("copy", "prolora-full"):
        out = tmp_path / f"{mode}.safetensors"
        rc, stdout, err = run_main(["transfer", "--source-base", p["src"], "--target-base", p["tgt"], "--lora", lora_path, "--out", out,
                                    "--mode", mode, "--no-cache", "--device", "cpu"], capsys)
        assert rc == 0, err
        assert f"{layout}.safetensors: {n} modules\n  {n} transferred" in stdout, stdout
        got = load_file(str(out))
        if mode == "copy":
            with caplog.at_level(logging.WARNING):
                want, after = applied(klein_files["tgt"], lora), applied(klein_files["tgt"], got)
            assert not not_loaded(caplog)
            for k in want:
                torch.testing.assert_close(after[k], want[k], rtol=1e-6, atol=1e-7)
        else:
            check_against_reference(lora, LAYOUTS[layout][1], klein_files["src"], klein_files["tgt"], got, mode)


def test_files_node_klein_base_to_distilled(nodes_by_id: dict[str, Any], klein_files: dict, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    import folder_paths

    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    root, layout = klein_files["root"], "flux2-bfl-peft"
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    try:
        names, report = _run(nodes_by_id, "ProLoRATransferLoRAFiles", source_model="diffusion_models/klein_base.safetensors",
                             target_model="diffusion_models/klein_distilled.safetensors", more_targets="", lora_name=f"{layout}.safetensors",
                             more_loras="", mode="prolora", subspace_rank=0, threshold=0.0, pairing="name",
                             filename_pattern="{lora}__to_{target}", device="cpu")
    finally:
        for folder in ("diffusion_models", "loras"):
            folder_paths.folder_names_and_paths[folder][0].remove(str(root / folder))
    n = len(LAYOUTS[layout][1])
    assert names.strip() == f"{layout}__to_klein_distilled.safetensors", names
    assert f"{layout}.safetensors: {n} modules\n  {n} transferred" in report, report
    out = root / "loras" / names.strip()
    try:
        check_against_reference(klein_files["loras"][layout], LAYOUTS[layout][1], klein_files["src"], klein_files["tgt"],
                                load_file(str(out)), "prolora")
    finally:
        out.unlink()


def test_cli_and_files_node_name_simpletuners_fused_modules_they_cannot_place(nodes_by_id: dict[str, Any], pair: Any, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A SimpleTuner LoRA trained with fused QKV projections, from files: the CLI and the files node
    warn, naming each fused module ComfyUI's key map has no entry for, and transfer the rest (CLI:
    ``copy`` parity); ``--strict`` makes the unplaced modules an error."""
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src, tgt = pair("flux")
    s = comfy_host.save_model_state(src, tmp_path / "diffusion_models" / "flux_src.safetensors")
    t = comfy_host.save_model_state(tgt, tmp_path / "diffusion_models" / "flux_tgt.safetensors")
    lora = {**comfy_host.factor_lora({n: module_shape(src, n) for n in SIMPLETUNER_MAPPED}, peft=True, rank=RANK, alpha=ALPHA, seed=8),
            **hidden_lora(src, SIMPLETUNER_FUSED, seed=9)}
    lora_path = tmp_path / "loras" / "simpletuner_fused.safetensors"
    lora_path.parent.mkdir()
    save_file(lora, str(lora_path))
    names, report = _files_node(nodes_by_id, tmp_path, "flux_src", "flux_tgt", "simpletuner_fused")
    assert names.strip() == "simpletuner_fused__to_flux_tgt.safetensors", names
    assert f"{len(SIMPLETUNER_MAPPED)} transferred" in report and f"{len(SIMPLETUNER_FUSED)} not mapped" in report, report
    assert f"warning: {len(SIMPLETUNER_FUSED)} LoRA modules have no weight in flux_src.safetensors" in report, report
    assert all(f"'{n}'" in report for n in SIMPLETUNER_FUSED), report
    out = tmp_path / "out.safetensors"
    rc, _, err = run_main(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", out, "--mode", "copy",
                                "--no-cache", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert f"{len(SIMPLETUNER_FUSED)} LoRA modules have no weight in" in err and all(f"'{n}'" in err for n in SIMPLETUNER_FUSED), err
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, load_file(str(out)))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    rc, _, err = run_main(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", tmp_path / "strict.safetensors",
                           "--mode", "copy", "--no-cache", "--device", "cpu", "--strict"], capsys)
    assert rc == 2 and "(--strict)" in err and "to_qkv" in err, err


# --------------------------------------------------------------------------------------
# Shapes that cannot match, through the nodes: one message naming both models
# --------------------------------------------------------------------------------------

def _size(model: Any) -> str:
    return f"{fm.parameter_count(model) / 1e6:.2f} M parameters"


@pytest.mark.parametrize("source_family, layout, kind", [("flux2_klein4b", "flux2-kohya", "Flux2"), ("flux", "simpletuner-lycoris", "Flux")])
def test_klein4b_or_flux1_lora_on_klein9b_gets_one_message(nodes_by_id: dict[str, Any], pair: Any, source_family: str, layout: str,
                                                           kind: str) -> None:
    """Klein 4B → 9B and Flux.1 → Klein 9B (every width differs): Match Modules and Project LoRA
    stop with one message naming both models ComfyUI's classes say they are, and their sizes."""
    src, _ = pair(source_family)
    tgt = fm.tiny_model("flux2_klein9b")
    lora = make_lora(src, layout, seed=10)
    with raises_prolora("shapes differ") as info:
        transfer(nodes_by_id, src, tgt, lora, "prolora")
    msg = str(info.value)
    assert type(info.value).__name__ == "ProLoRAError" and msg.count("\n") == 0, msg
    n = len(LAYOUTS[layout][1])
    assert (f"the source model is {kind} ({_size(src)}, hidden_size 64) and the target model is Flux2 ({_size(tgt)}, hidden_size 96): "
            f"none of the LoRA's {n} modules has a weight of its shape in the target") in msg, msg
    assert "shapes differ: this method needs same-shape models" in msg, msg


def test_flux1_lora_on_a_flux2_of_the_same_width_transfers_nothing_at_the_default_threshold(nodes_by_id: dict[str, Any], pair: Any) -> None:
    """Flux.1-dev and Klein 4B have the same hidden size (3072), and so do the tiny models: their
    attention weights share shapes, so there is no shape message. Those weights are unrelated, their
    Φ is low (here 0.06–0.26), and at the default threshold (0.8) none transfers; the summary names
    both families (``Flux → Flux2``), and the MLP and per-block modulation weights are reported
    "another shape" / "not in target"."""
    src, _ = pair("flux")
    tgt = fm.tiny_model("flux2_klein4b")
    lora = make_lora(src, "simpletuner-lycoris", seed=11)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=basis(nodes_by_id, src), target_basis=basis(nodes_by_id, tgt),
                          lora=lora, threshold=0.8, pairing="name")
    assert "ProLoRA match: Flux → Flux2" in summary, summary
    phis = [min(r["phi_u"], r["phi_v"]) for r in match.rows() if r.get("phi_u") is not None]
    assert phis and max(phis) < 0.5, phis
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora", out_rank=0, rescale_to_source_norm=False)
    assert f"0/{len(LAYOUTS['simpletuner-lycoris'][1])} modules transferred" in report and "below threshold" in report, report
    assert "not in the target in that shape" in report, report
    assert not out, sorted(out)[:4]


# --------------------------------------------------------------------------------------
# Files with the real key layout at real size: what ComfyUI 0.3.75's detection makes of them
# --------------------------------------------------------------------------------------

#: name → (hidden size, latent channels × patch², FLUX.2?): Flux.1-dev, FLUX.2-dev, FLUX.2 Klein 4B and 9B.
REAL = {"flux1_dev": (3072, 64, False), "flux2_dev": (6144, 128, True), "klein_4b": (3072, 128, True), "klein_9b": (4096, 128, True)}
#: LoRA modules on the small weights written below (kohya names, which every Flux key map has).
REAL_MODULES = {"lora_unet_img_in": "img_in.weight", "lora_unet_time_in_in_layer": "time_in.in_layer.weight",
                "lora_unet_final_layer_linear": "final_layer.linear.weight"}


def real_layout_file(path: Path, hidden: int, channels: int, flux2: bool) -> dict[str, torch.Tensor]:
    """A bare diffusion-model file with the real key names and real shapes of the tensors ComfyUI's
    detection reads (``img_in`` gives the hidden size and channels, ``double_blocks.0.img_attn.norm.key_norm.scale``
    and, for Flux.1, ``vector_in``/``guidance_in`` are read by shape or presence), plus the small
    weights the LoRA sits on (``time_in.in_layer``, ``final_layer.linear``). The one weight whose
    presence alone tells FLUX.2 from Flux.1, ``double_stream_modulation_img.lin`` ([6h, h], 226 M
    values for FLUX.2-dev), is written with its real row count and no columns: detection tests
    only that the key exists. Nothing else of the model is written, so the sizes in messages are
    those of these tensors. fp16, seeded values."""
    gen = torch.Generator().manual_seed(hidden + channels)

    def rnd(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(shape, generator=gen)).half()

    t = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(128, dtype=torch.float16), "img_in.weight": rnd(hidden, channels),
         "time_in.in_layer.weight": rnd(hidden, 256), "final_layer.linear.weight": rnd(channels, hidden)}
    if flux2:
        t["double_stream_modulation_img.lin.weight"] = torch.empty(6 * hidden, 0, dtype=torch.float16)
    else:
        t["vector_in.in_layer.weight"], t["guidance_in.in_layer.weight"] = rnd(hidden, 768), rnd(hidden, 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return t


@pytest.fixture(scope="module")
def real_files(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("flux_real")
    tensors = {name: real_layout_file(root / "diffusion_models" / f"{name}.safetensors", *spec) for name, spec in REAL.items()}
    (root / "loras").mkdir()
    for name in ("flux1_dev", "klein_4b"):
        shapes = {m: tuple(tensors[name][k].shape) for m, k in REAL_MODULES.items()}
        save_file(comfy_host.factor_lora(shapes, peft=False, rank=RANK, alpha=ALPHA, seed=12), str(root / "loras" / f"{name}_style.safetensors"))
    return {"root": root, "tensors": tensors, "path": lambda n: root / "diffusion_models" / f"{n}.safetensors",
            "lora": lambda n: root / "loras" / f"{n}_style.safetensors"}


def test_comfyuis_detection_builds_flux1_and_flux2_dev_but_not_klein(real_files: dict) -> None:
    """ComfyUI 0.3.75's own detection (``model_config_from_unet``) and model class (``get_model`` on
    the meta device, what its loader calls) on the files: Flux.1-dev → ``Flux``, FLUX.2-dev →
    ``Flux2`` (hidden 6144, 48 heads); Klein 4B and 9B are detected as ``Flux2`` with FLUX.2-dev's 48
    heads of 128 at their own hidden size, which the model class refuses: this host cannot load a
    Klein checkpoint at all."""
    import comfy.model_detection

    built, failed = {}, {}
    for name, t in real_files["tensors"].items():
        config = comfy.model_detection.model_config_from_unet({k: torch.empty(v.shape, device="meta") for k, v in t.items()}, "")
        assert config.unet_config["hidden_size"] == REAL[name][0] and config.unet_config.get("image_model") == ("flux2" if REAL[name][2] else "flux")
        try:
            config.get_model({}, "", device=torch.device("meta"))
            built[name] = type(config).__name__
        except ValueError as e:
            failed[name] = (config.unet_config["num_heads"], str(e))
    assert built == {"flux1_dev": "Flux", "flux2_dev": "Flux2"}, built
    assert failed == {"klein_4b": (48, "Got [32, 32, 32, 32] but expected positional dim 64"),
                      "klein_9b": (48, "Hidden size 4096 must be divisible by num_heads 48")}, failed


def _files_node(nodes_by_id: dict[str, Any], root: Path, source: str, target: str, lora: str) -> tuple[str, str]:
    import folder_paths

    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    try:
        return _run(nodes_by_id, "ProLoRATransferLoRAFiles", source_model=f"diffusion_models/{source}.safetensors",  # type: ignore[return-value]
                    target_model=f"diffusion_models/{target}.safetensors", more_targets="", lora_name=f"{lora}.safetensors", more_loras="",
                    mode="prolora", subspace_rank=0, threshold=0.0, pairing="name", filename_pattern="{lora}__to_{target}", device="cpu")
    finally:
        for folder in ("diffusion_models", "loras"):
            folder_paths.folder_names_and_paths[folder][0].remove(str(root / folder))


def test_flux1_dev_lora_onto_flux2_dev_gives_one_message(nodes_by_id: dict[str, Any], real_files: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI and the files node: one message naming ComfyUI's detected families and widths."""
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    with raises_prolora("shapes differ") as info:
        _files_node(nodes_by_id, real_files["root"], "flux1_dev", "flux2_dev", "flux1_dev_style")
    assert type(info.value).__name__ == "ProLoRAError"
    assert "the source model is Flux (" in str(info.value) and "hidden_size 3072) and the target model is Flux2 (" in str(info.value)
    p = real_files["path"]
    rc, _, err = run_main(["transfer", "--source-base", p("flux1_dev"), "--target-base", p("flux2_dev"), "--lora", real_files["lora"]("flux1_dev"),
                           "--out-dir", tmp_path, "--no-cache", "--device", "cpu"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, err
    size = {n: f"{sum(v.numel() for v in real_files['tensors'][n].values()) / 1e6:.2f} M parameters" for n in ("flux1_dev", "flux2_dev")}
    assert (f"the source model is Flux ({size['flux1_dev']}, hidden_size 3072) and the target model is Flux2 ({size['flux2_dev']}, "
            f"hidden_size 6144): none of the LoRA's 3 modules has a weight of its shape in the target") in errors[0], errors[0]
    assert "shapes differ: this method needs same-shape models" in errors[0]
    assert not list(tmp_path.glob("*.safetensors"))


def test_klein_4b_and_9b_files_cannot_be_read_by_this_comfyui_and_the_pack_says_so(nodes_by_id: dict[str, Any], real_files: dict,
                                                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Klein 4B → 9B from files. The files node needs ComfyUI's reading of the file: it stops with
    the reason, naming the file. The CLI says ComfyUI cannot read either file, places the LoRA by
    weight names, and stops with one "shapes differ" message naming the two files."""
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    p = real_files["path"]
    with raises_prolora("cannot build that model") as info:
        _files_node(nodes_by_id, real_files["root"], "klein_4b", "klein_9b", "klein_4b_style")
    msg = str(info.value)
    assert type(info.value).__name__ == "ProLoRAError" and "klein_4b.safetensors" in msg, msg
    assert "ComfyUI detects Flux2 (hidden_size 3072) in this file but cannot build that model (ValueError: Got [32, 32, 32, 32]" in msg, msg
    rc, _, err = run_main(["transfer", "--source-base", p("klein_4b"), "--target-base", p("klein_9b"), "--lora", real_files["lora"]("klein_4b"),
                           "--out-dir", tmp_path, "--no-cache", "--device", "cpu"], capsys)
    assert rc == 2, err
    assert "ComfyUI cannot read klein_4b.safetensors" in err and "ComfyUI cannot read klein_9b.safetensors" in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the source model is klein_4b.safetensors" in errors[0] and "the target model is klein_9b.safetensors" in errors[0]
    assert "shapes differ: this method needs same-shape models" in errors[0], errors[0]
