"""The pack's nodes inside the real ComfyUI host, in-process: the three ProLoRA steps on real
MODEL / CLIP / LORA_MODEL objects, checked against core ComfyUI nodes and a dense reference."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import comfy_host
from reference import reference_transfer

# Modules of the tiny SD1.5 UNet a LoRA touches: an attention linear, a 1×1 conv proj_in, a 3×3 res conv.
MODULES = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "middle_block.1.transformer_blocks.0.ff.net.2",
]


def _descendant(model: Any, seed: int, eps: float) -> Any:
    return comfy_host.perturbed_copy(model, eps, seed)


def _kohya_lora(model: Any, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    return comfy_host.kohya_lora(model, MODULES, rank=rank, alpha=2.0, seed=seed)


def _run(nodes_by_id: dict[str, Any], node_id: str, **kwargs: Any) -> tuple:
    return tuple(nodes_by_id[node_id].execute(**kwargs).args)


def _transfer(nodes_by_id: dict[str, Any], src: Any, tgt: Any, lora: dict, mode: str = "prolora-full", threshold: float = 0.0,
              clip_src: Any = None, clip_tgt: Any = None) -> tuple[Any, str, Any, str]:
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=clip_src, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=clip_tgt, subspace_rank=0, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=threshold, pairing="name")
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode=mode, out_rank=0, rescale_to_source_norm=False)
    return out, report, match, summary


def test_pack_registers_v3_nodes_with_tooltips(nodes_by_id: dict[str, Any]) -> None:
    expected = {"ProLoRAComputeBasis", "ProLoRAMatchModules", "ProLoRAProjectLoRA", "ProLoRALoadLoRA", "ProLoRASaveLoRA", "ProLoRAApplyLoRA"}
    assert expected <= set(nodes_by_id)
    for node_id, node in nodes_by_id.items():
        schema = node.define_schema()
        assert node_id.startswith("ProLoRA") and schema.category == "ProLoRA"
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"


@pytest.mark.parametrize("mode", ["prolora-full", "prolora", "subspace", "copy"])
def test_core_lora_loader_applies_exactly_the_projected_update(nodes_by_id: dict[str, Any], comfyui: Any, mode: str) -> None:
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=5, eps=0.05)
    lora = _kohya_lora(src)
    out, report, match, summary = _transfer(nodes_by_id, src, tgt, lora, mode)
    assert all(k.startswith("diffusion_model.") for k in out), list(out)[:3]
    assert f"{len(MODULES)}/{len(MODULES)} modules transferred" in report
    from comfy_extras.nodes_train import LoraModelLoader

    (patched,) = LoraModelLoader.execute(model=tgt, lora=out, strength_model=1.0).args
    before = comfy_host.unet_weights(tgt)
    after = comfy_host.unet_weights(patched, patched=True)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"diffusion_model.{m}.weight" for m in MODULES}
    src_sd, tgt_sd = comfy_host.unet_weights(src), before
    for mod in MODULES:
        key = f"diffusion_model.{mod}.weight"
        name = "lora_unet_" + mod.replace(".", "_")
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        r = down.shape[0]
        dense = (2.0 / r) * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())
        m, n = dense.shape
        k = min(64, min(m, n) // 4)
        expected = reference_transfer(dense.numpy(), src_sd[key].reshape(m, -1).double().numpy(), tgt_sd[key].reshape(m, -1).double().numpy(), k, mode)
        got = (after[key] - before[key]).reshape(m, -1).double().numpy()
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected), mode


def test_kohya_peft_and_native_inputs_give_the_same_lora(nodes_by_id: dict[str, Any]) -> None:
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=6, eps=0.05)
    kohya = _kohya_lora(src)
    native, peft = {}, {}
    for key, t in kohya.items():
        name, _, rest = key.partition(".")
        mod = next(m for m in MODULES if "lora_unet_" + m.replace(".", "_") == name)
        native[f"diffusion_model.{mod}.{rest}"] = t
        peft_rest = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight", "alpha": "alpha"}[rest]
        peft[f"diffusion_model.{mod}.{peft_rest}"] = t
    outs = [_transfer(nodes_by_id, src, tgt, lora)[0] for lora in (kohya, native, peft)]
    assert set(outs[0]) == set(outs[1]) == set(outs[2])
    for key in outs[0]:
        assert torch.allclose(outs[0][key], outs[1][key]) and torch.allclose(outs[0][key], outs[2][key]), key


def test_save_lora_keeps_format_and_loads_in_core_loader_without_missing_keys(nodes_by_id: dict[str, Any], comfyui: Any, tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    import folder_paths
    import safetensors

    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=7, eps=0.05)
    lora = _kohya_lora(src)
    (tmp_path / "loras").mkdir()
    src_file = tmp_path / "loras" / "style.safetensors"
    from safetensors.torch import save_file

    save_file(lora, str(src_file), metadata={"ss_tag_frequency": '{"style": {"stripes": 3}}', "ss_sd_model_name": "tiny-src"})
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"), is_default=True)
    (loaded,) = _run(nodes_by_id, "ProLoRALoadLoRA", lora_name="style.safetensors")
    assert loaded.metadata["ss_tag_frequency"] == '{"style": {"stripes": 3}}'
    out, *_ = _transfer(nodes_by_id, src, tgt, loaded)
    (name1,) = _run(nodes_by_id, "ProLoRASaveLoRA", lora=out, filename="prolora/style_tiny", key_format="as input", overwrite=False)
    (name2,) = _run(nodes_by_id, "ProLoRASaveLoRA", lora=out, filename="prolora/style_tiny", key_format="as input", overwrite=False)
    assert name1 == "prolora/style_tiny.safetensors" and name2 != name1  # never overwrites silently
    path = Path(folder_paths.get_full_path("loras", name1))
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora)  # kohya in, kohya out
    assert meta["ss_tag_frequency"] == '{"style": {"stripes": 3}}' and meta["prolora.mode"] == "prolora-full"
    assert meta["ss_sd_model_name"] != "tiny-src" and "/" not in meta["prolora.source_base"]
    caplog.set_level(logging.WARNING)
    clip = comfy_host.tiny_clip(0)
    m, c = comfyui.LoraLoader().load_lora(tgt, clip, name1, 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(m.patches) == len(MODULES)


def test_clip_lora_transfers_through_the_clip_path(nodes_by_id: dict[str, Any], comfyui: Any) -> None:
    src, tgt = comfy_host.tiny_sd15_model(0), comfy_host.tiny_sd15_model(0)
    clip_s, clip_t = comfy_host.tiny_clip(0), comfy_host.tiny_clip(0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in clip_t.cond_stage_model.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    sd = clip_s.cond_stage_model.state_dict()
    key = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    w = sd[key]
    gen = torch.Generator().manual_seed(4)
    lora = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn((w.shape[0], 2), generator=gen),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn((2, w.shape[1]), generator=gen)}
    out, report, *_ = _transfer(nodes_by_id, src, tgt, lora, clip_src=clip_s, clip_tgt=clip_t)
    assert "1/1 modules transferred" in report
    assert all(k.startswith("text_encoders.") for k in out)
    m, c = _run(nodes_by_id, "ProLoRAApplyLoRA", model=tgt, clip=clip_t, lora=out, strength_model=1.0, strength_clip=1.0)
    assert key in c.patcher.patches and not m.patches


def _diffusers_names(model: Any, modules: list[str]) -> dict[str, str]:
    """LDM module → kohya diffusers-style name (``lora_unet_down_blocks_…``) from ComfyUI's key map."""
    import comfy.lora

    km = comfy.lora.model_lora_keys_unet(model.model, {})
    out = {}
    for mod in modules:
        names = [n for n, k in km.items() if k == f"diffusion_model.{mod}.weight" and n.startswith(("lora_unet_down", "lora_unet_mid", "lora_unet_up"))]
        if names:
            out[mod] = names[0]
    return out


def test_diffusers_style_kohya_names_give_the_same_lora(nodes_by_id: dict[str, Any]) -> None:
    """kohya's SD1.5 LoRAs use diffusers block names; ComfyUI's key map places them on LDM weights."""
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=8, eps=0.05)
    ldm = _kohya_lora(src)
    names = _diffusers_names(src, MODULES)
    assert len(names) >= 3, names  # attention, proj_in and res conv have diffusers names
    diffusers = {}
    for key, t in ldm.items():
        name, _, rest = key.partition(".")
        mod = next(m for m in MODULES if "lora_unet_" + m.replace(".", "_") == name)
        diffusers[f"{names.get(mod, name)}.{rest}"] = t
    a, *_ = _transfer(nodes_by_id, src, tgt, ldm)
    b, report, *_ = _transfer(nodes_by_id, src, tgt, diffusers)
    assert f"{len(MODULES)}/{len(MODULES)} modules transferred" in report
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k]) for k in a)


def test_sdxl_shaped_transfer_is_exact_through_core_loader(nodes_by_id: dict[str, Any]) -> None:
    from comfy_extras.nodes_train import LoraModelLoader

    src = comfy_host.tiny_sdxl_model(0)
    tgt = comfy_host.tiny_sdxl_model(0)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p_s, p_t in zip(src.model.parameters(), tgt.model.parameters()):
            p_t.copy_(p_s + 0.05 * p_s.abs().mean() * torch.randn(p_s.shape, generator=gen))
    sd = src.model.state_dict()
    mods = [k[len("diffusion_model."):-len(".weight")] for k in sd if k.endswith(("attn2.to_k.weight", "proj_in.weight")) and sd[k].ndim == 2][:3]
    lora = {}
    for mod in mods:
        w = sd[f"diffusion_model.{mod}.weight"]
        lora[f"lora_unet_{mod.replace('.', '_')}.lora_up.weight"] = torch.randn((w.shape[0], 2), generator=gen)
        lora[f"lora_unet_{mod.replace('.', '_')}.lora_down.weight"] = torch.randn((2, w.shape[1]), generator=gen)
    out, report, *_ = _transfer(nodes_by_id, src, tgt, lora, "prolora")
    assert f"{len(mods)}/{len(mods)} modules transferred" in report
    (patched,) = LoraModelLoader.execute(model=tgt, lora=out, strength_model=1.0).args
    before, after = comfy_host.unet_weights(tgt), comfy_host.unet_weights(patched, patched=True)
    for mod in mods:
        key = f"diffusion_model.{mod}.weight"
        name = f"lora_unet_{mod.replace('.', '_')}"
        dense = (lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]).double().numpy()
        k = min(64, min(dense.shape) // 4)
        expected = reference_transfer(dense, comfy_host.unet_weights(src)[key].double().numpy(), before[key].double().numpy(), k, "prolora")
        got = (after[key] - before[key]).double().numpy()
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)


def test_similarity_pairing_and_patched_model_are_reported(nodes_by_id: dict[str, Any], comfyui: Any) -> None:
    """A target whose blocks are swapped is re-paired by similarity; a LoRA-patched source is flagged."""
    from comfy_extras.nodes_train import LoraModelLoader

    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=12, eps=0.01)
    a, b = "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_k"
    with torch.no_grad():  # swap two same-shape weights in the target: "renumbered" modules
        wa = tgt.model.get_parameter(f"diffusion_model.{a}.weight")
        wb = tgt.model.get_parameter(f"diffusion_model.{b}.weight")
        tmp = wa.clone()
        wa.copy_(wb)
        wb.copy_(tmp)
    gen = torch.Generator().manual_seed(13)
    w = src.model.state_dict()[f"diffusion_model.{a}.weight"]
    lora = {f"lora_unet_{a.replace('.', '_')}.lora_up.weight": torch.randn((w.shape[0], 2), generator=gen),
            f"lora_unet_{a.replace('.', '_')}.lora_down.weight": torch.randn((2, w.shape[1]), generator=gen)}
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.8, pairing="similarity")
    assert "1 re-paired by similarity" in summary
    out, _ = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k[: -len(".alpha")] for k in out} == {f"diffusion_model.{b}"}
    assert out.save_names[f"diffusion_model.{b}"] == f"lora_unet_{b.replace('.', '_')}"  # named after the target, kohya style kept
    (patched_src,) = LoraModelLoader.execute(model=src, lora=out, strength_model=1.0).args
    (bp,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=patched_src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    _, summary2 = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bp, target_basis=bt, lora=lora, threshold=0.8, pairing="name")
    assert "carries patches" in summary2


def test_rescale_and_out_rank_options(nodes_by_id: dict[str, Any]) -> None:
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=14, eps=0.2)
    lora = _kohya_lora(src)
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, _ = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    _, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora", out_rank=0, rescale_to_source_norm=True)
    assert "overall norm ratio transferred/source: 1.000" in report
    out, _ = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora", out_rank=2, rescale_to_source_norm=False)
    assert all(t.shape[0] == 2 for k, t in out.items() if k.endswith("lora_down.weight"))
    assert float(out.metadata.get("prolora.energy_dropped", "nan")) > 0


def test_basis_reads_original_weights_while_a_patched_clone_is_loaded(nodes_by_id: dict[str, Any]) -> None:
    """Sampling with a LoRA-patched clone patches the shared weights in place; the basis of the
    plain model must still be of its own (unpatched) weights."""
    from comfy_extras.nodes_train import LoraModelLoader

    src = comfy_host.tiny_sd15_model(0)
    lora = _kohya_lora(src)
    key = f"diffusion_model.{MODULES[0]}.weight"
    original = src.model.state_dict()[key].detach().clone()
    (patched,) = LoraModelLoader.execute(model=src, lora={f"diffusion_model.{MODULES[0]}.lora_up.weight": lora[f"lora_unet_{MODULES[0].replace('.', '_')}.lora_up.weight"],
                                                          f"diffusion_model.{MODULES[0]}.lora_down.weight": lora[f"lora_unet_{MODULES[0].replace('.', '_')}.lora_down.weight"]},
                                         strength_model=1.0).args
    comfy_host.sample_step(patched, comfy_host.tiny_conditioning(patched), comfy_host.tiny_conditioning(patched, seed=1))
    assert not torch.equal(src.model.state_dict()[key], original), "the clone's patch should now sit in the shared weights"
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    assert torch.equal(bs.parts["unet"].get(key), original)
    (bp,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=patched, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    assert not torch.equal(bp.parts["unet"].get(key), original)


# --------------------------------------------------------------------------------------
# Node state: settings on both sides, immutable match objects, one parse per LoRA
# --------------------------------------------------------------------------------------


def _module(pack: Any, name: str) -> Any:
    import sys

    return sys.modules[f"{pack.__name__}.{name}"]


def test_non_default_rank_device_and_cache_on_both_sides(nodes_by_id: dict[str, Any], pack: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """subspace_rank 3, device cpu and the cache on, set on both Compute Basis nodes: every basis has
    k = 3, both sides' bases go to (and later come from) the cache, and the projection is the
    dense reference's with k = 3."""
    from comfy_extras.nodes_train import LoraModelLoader

    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=21, eps=0.05)
    lora = _kohya_lora(src)

    def match_once() -> Any:
        (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=3, device="cpu", use_cache=True)
        (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=3, device="cpu", use_cache=True)
        match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
        return match

    first = match_once()
    rows = first.rows()
    assert len(rows) == len(MODULES) and {r["k"] for r in rows} == {3}
    assert first.svd_computed == 2 * len(MODULES) and first.bases_from_cache == 0  # both sides computed …
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2 * len(MODULES)  # … and cached
    second = match_once()
    assert second.svd_computed == 0 and second.bases_from_cache == 2 * len(MODULES)  # both sides read back
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=second, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert out.metadata["prolora.subspace_rank"] == "3"
    (patched,) = LoraModelLoader.execute(model=tgt, lora=out, strength_model=1.0).args
    before, after, src_sd = comfy_host.unet_weights(tgt), comfy_host.unet_weights(patched, patched=True), comfy_host.unet_weights(src)
    for mod in MODULES:
        key = f"diffusion_model.{mod}.weight"
        name = "lora_unet_" + mod.replace(".", "_")
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        dense = (2.0 / 4) * (up.reshape(up.shape[0], 4).double() @ down.reshape(4, -1).double())
        m = dense.shape[0]
        expected = reference_transfer(dense.numpy(), src_sd[key].reshape(m, -1).double().numpy(), before[key].reshape(m, -1).double().numpy(), 3,
                                      "prolora-full")
        got = (after[key] - before[key]).reshape(m, -1).double().numpy()
        # k = 3 on a tiny random model has almost no spectral gap: the randomized basis stops at
        # 1 − Φ ≤ 1e-5 (principal angles ≈ 3e-3), hence the looser bound than at the default k.
        assert np.linalg.norm(got - expected) <= 3e-3 * np.linalg.norm(expected), mod
        assert np.linalg.norm(got - dense.numpy()) > 0.01 * np.linalg.norm(expected), mod  # the projection did change it (3x the bound)


def test_cache_off_on_both_sides_writes_nothing(nodes_by_id: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=22, eps=0.05)
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=5, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=5, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=_kohya_lora(src), threshold=0.0, pairing="name")
    assert {r["k"] for r in match.rows()} == {5} and match.svd_computed == 2 * len(MODULES)
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("target_settings, named", [
    ({"subspace_rank": 3}, "subspace_rank (source 8, target 3)"),
    ({"use_cache": False}, "use_cache (source on, target off)"),
    ({"device": "cuda"}, "device (source cpu, target cuda)"),
])
def test_match_modules_refuses_compute_basis_nodes_that_disagree(nodes_by_id: dict[str, Any], pack: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, target_settings: dict, named: str) -> None:
    """The target's own settings used to be ignored silently (rank 3 and cache off gave rank 8 and a
    filled cache); now the pair is refused, naming each difference."""
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src = comfy_host.tiny_sd15_model(0)
    settings = {"subspace_rank": 8, "device": "cpu", "use_cache": True}
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, **settings)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=_descendant(src, seed=23, eps=0.05), clip=None, **{**settings, **target_settings})
    error = _module(pack, "prolora_core.errors").ProLoRAError
    with pytest.raises(error, match="must use the same settings") as info:
        _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=_kohya_lora(src), threshold=0.0, pairing="name")
    assert named in str(info.value)
    assert not (tmp_path / "cache").exists()  # refused before any basis was computed


def test_project_lora_with_another_lora_leaves_the_match_unchanged(nodes_by_id: dict[str, Any]) -> None:
    """ComfyUI caches Match Modules' output: Project LoRA with a LoRA that touches more modules must
    not add them to that object (it grew from 2 to 3 modules before)."""
    import dataclasses

    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=24, eps=0.05)
    small = comfy_host.kohya_lora(src, MODULES[:2], rank=2, alpha=2.0, seed=3)
    bigger = comfy_host.kohya_lora(src, MODULES[:3], rank=2, alpha=2.0, seed=4)
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=small, threshold=0.0, pairing="name")
    rows, counts = match.rows(), (match.svd_computed, match.bases_from_cache)
    assert len(rows) == 2
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=bigger, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert "3/3 modules transferred" in report  # Project LoRA matched the third module for itself …
    assert match.rows() == rows and (match.svd_computed, match.bases_from_cache) == counts  # … on a new object
    assert sum(len(m) for m in match.matches.values()) == 2 and match.summary() == summary
    _run(nodes_by_id, "ProLoRAReportImage", match=match, lora=out)
    assert match.rows() == rows
    with pytest.raises(TypeError):
        match.matches["unet"]["diffusion_model.x.weight"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        match.unmapped = ("x",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        bs.key_maps["unet"]["lora_unet_x"] = "diffusion_model.x.weight"  # type: ignore[index]


def test_a_lora_model_is_parsed_once_and_again_after_a_change(nodes_by_id: dict[str, Any], pack: Any) -> None:
    matching, bridge = _module(pack, "nodes.matching"), _module(pack, "nodes.bridge")
    src = comfy_host.tiny_sd15_model(0)
    tgt = _descendant(src, seed=25, eps=0.05)
    lora = bridge.LoraModel(_kohya_lora(src), {"ss_output_name": "style"})
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, _ = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    parsed = matching.parse_lora_model(lora)
    out, _ = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert matching.parse_lora_model(lora) is parsed  # Match Modules' parse served Project LoRA
    name = "lora_unet_" + MODULES[0].replace(".", "_")
    before = parsed.modules[name].update.dense().clone()
    lora[f"{name}.lora_up.weight"].mul_(2.0)  # changed in place: parsed again
    again = matching.parse_lora_model(lora)
    assert again is not parsed and torch.allclose(again.modules[name].update.dense(), 2 * before)
    fresh = bridge.LoraModel({k: t.clone() for k, t in lora.items()}, {"ss_output_name": "style"})
    outs = [_run(nodes_by_id, "ProLoRAProjectLoRA", lora=x, match=match, mode="copy", out_rank=0, rescale_to_source_norm=False)[0] for x in (lora, fresh)]
    assert set(outs[0]) == set(outs[1]) and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])  # Project LoRA saw the change


def test_a_lora_model_of_inference_tensors_is_parsed_once_too(pack: Any) -> None:
    """ComfyUI runs nodes under ``torch.inference_mode``: the tensors of a loaded LoRA then have no
    version counter; the parse is still kept, and a replaced tensor still parses again."""
    matching, bridge = _module(pack, "nodes.matching"), _module(pack, "nodes.bridge")
    src = comfy_host.tiny_sd15_model(0)
    with torch.inference_mode():
        lora = bridge.LoraModel({k: t.clone() for k, t in _kohya_lora(src).items()})
        assert all(t.is_inference() for t in lora.values())
        first = matching.parse_lora_model(lora)
        assert matching.parse_lora_model(lora) is first
        name = "lora_unet_" + MODULES[0].replace(".", "_")
        lora[f"{name}.lora_up.weight"] = 3 * lora[f"{name}.lora_up.weight"]
        again = matching.parse_lora_model(lora)
        assert again is not first and torch.allclose(again.modules[name].update.dense(), 3 * first.modules[name].update.dense())
