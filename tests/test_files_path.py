"""The file-to-file path (``prolora_core.file_transfer.transfer_files``) through both of its front
ends, the CLI and the Transfer LoRA (files) node, on base files written from tiny models of ComfyUI's
own classes (real key names and layout, small widths):

* the CLI places modules with ComfyUI's key map of the detected model (``prolora_host``): a
  diffusers-style Flux LoRA (q/k/v on slices of the fused ``qkv``) transfers with ``copy`` parity to
  ComfyUI's loader, also as a real ``python -m prolora_core`` subprocess; ``--key-map names`` cannot
  place it;
* several targets in one pass: one Wan 2.1 LoRA onto both Wan 2.2 experts, one output per target
  named after it, each equal to the dense float64 reference against its own expert, the source's
  bases computed once (without a basis cache too);
* shapes that cannot match (Wan 14B LoRA and bases onto Wan 1.3B): one message naming both detected
  models and their sizes, from the CLI and from the files node;
* text encoders a checkpoint carries: an SD1.5-layout checkpoint's ``cond_stage_model.…`` with
  ``copy`` parity under ``comfy.sd.load_lora_for_models``, and SDXL's CLIP-L and OpenCLIP-G (q/k/v on
  row slices of ``in_proj_weight``) against what ComfyUI's checkpoint loader loads.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_host
import family_models as fm
from fixtures_files import read_report, run_cli, run_main
from test_family_flux import DIFFUSERS, PREFIX_D, PREFIX_S
from test_family_flux import applied as flux_applied
from test_family_flux import make_lora as flux_lora
from test_family_wan_qwen import LAYOUTS as WAN_LAYOUTS
from test_family_wan_qwen import check_against_reference
from test_family_wan_qwen import make_lora as wan_lora

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def flux_files(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path, Path, dict]:
    """A tiny Flux and a perturbed copy as checkpoint files, and a diffusers-style LoRA file."""
    root = tmp_path_factory.mktemp("flux")
    src = comfy_host.tiny_flux_model(0)
    tgt = comfy_host.perturbed_copy(src, 0.05, seed=11)
    s, t = comfy_host.save_model_state(src, root / "flux_src.safetensors"), comfy_host.save_model_state(tgt, root / "flux_tgt.safetensors")
    lora = flux_lora(src, "diffusers", seed=6)
    save_file(lora, str(root / "flux_style.safetensors"))
    return tgt, s, t, root / "flux_style.safetensors", lora


def _check_flux_copy(tgt: Any, out: Path, lora: dict, caplog: pytest.LogCaptureFixture) -> None:
    got_lora = load_file(str(out))
    assert {PREFIX_D + "attn.to_q.lora_up.weight", PREFIX_S + "proj_mlp.lora_down.weight"} <= set(got_lora), sorted(got_lora)[:6]
    with caplog.at_level(logging.WARNING):
        want, got = flux_applied(tgt, lora), flux_applied(tgt, got_lora)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_cli_places_a_diffusers_flux_lora_with_comfyuis_key_map(flux_files: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    tgt, s, t, lora_path, lora = flux_files
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    rc, stdout, err = run_main(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", out, "--mode", "copy",
                                "--no-cache", "--device", "cpu", "--report", report], capsys)
    assert rc == 0, err
    assert f"flux_style.safetensors: {len(DIFFUSERS)} modules\n  {len(DIFFUSERS)} transferred" in stdout, stdout
    assert read_report(report)["summary"]["key_map"] == "ComfyUI's key map for Flux"
    _check_flux_copy(tgt, out, lora, caplog)
    # Without ComfyUI's map the names are the checkpoint's own: nothing of a diffusers LoRA is placed.
    rc, _, err = run_main(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", tmp_path / "names.safetensors",
                           "--mode", "copy", "--no-cache", "--key-map", "names"], capsys)
    assert rc == 2 and f"none of the LoRA's {len(DIFFUSERS)} modules has a weight in the source base" in err, err


def test_cli_subprocess_imports_comfyui_for_the_key_map(flux_files: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``python -m prolora_core`` from the repository root (the pack's ``nodes/`` folder in the current
    directory): ComfyUI is found in .comfyui and its ``nodes`` module is not shadowed."""
    tgt, s, t, lora_path, lora = flux_files
    out = tmp_path / "sub.safetensors"
    proc = run_cli(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", out, "--mode", "copy", "--no-cache",
                    "--device", "cpu", "--key-map", "comfyui"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_flux_copy(tgt, out, lora, caplog)


# --------------------------------------------------------------------------------------
# Wan 2.1 → both Wan 2.2 experts in one pass
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_files(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("wan")
    wan21 = fm.tiny_model("wan21_14b")
    high, low = fm.wan22_experts_from(wan21)
    paths = {"src": comfy_host.save_model_state(wan21, root / "diffusion_models" / "wan21.safetensors", prefix=""),
             "high": comfy_host.save_model_state(high, root / "diffusion_models" / "wan22_high.safetensors", prefix=""),
             "low": comfy_host.save_model_state(low, root / "diffusion_models" / "wan22_low.safetensors", prefix="")}
    small = fm.tiny_model("wan21_1.3b")
    paths["small"] = comfy_host.save_model_state(small, root / "diffusion_models" / "wan13.safetensors", prefix="")
    lora = wan_lora(wan21, "wan-musubi", seed=5)
    (root / "loras").mkdir()
    save_file(lora, str(root / "loras" / "wan_style.safetensors"))
    yield {"root": root, "models": {"src": wan21, "high": high, "low": low, "small": small}, "paths": paths, "lora": lora,
           "lora_path": root / "loras" / "wan_style.safetensors"}


N_WAN = len(WAN_LAYOUTS["wan-musubi"][1])


def test_cli_transfers_one_wan21_lora_to_both_wan22_experts(wan_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, m = wan_files["paths"], wan_files["models"]
    rc, stdout, err = run_main(["transfer", "--source-base", p["src"], "--target-base", p["high"], "--target-base", p["low"],
                                "--lora", wan_files["lora_path"], "--out-dir", tmp_path, "--mode", "prolora", "--no-cache", "--device", "cpu"],
                               capsys)
    assert rc == 0, err
    # no disk cache: the source's bases are kept in memory for the second target
    assert f"wan21.safetensors → wan22_high.safetensors; bases computed {2 * N_WAN}, from cache 0" in stdout, stdout
    assert f"wan21.safetensors → wan22_low.safetensors; bases computed {N_WAN}, from cache {N_WAN}" in stdout, stdout
    outs = {e: load_file(str(tmp_path / f"wan_style__to_wan22_{e}.safetensors")) for e in ("high", "low")}
    for e in ("high", "low"):
        check_against_reference(wan_files["lora"], "wan-musubi", m["src"], m[e], outs[e], "prolora")
    key = "lora_unet_blocks_0_self_attn_q.lora_up.weight"
    assert not torch.equal(outs["high"][key], outs["low"][key]), "each expert gets its own projection"


def _files_node(nodes_by_id: dict[str, Any], root: Path, target: str, more_targets: str = "", mode: str = "prolora") -> tuple[str, str]:
    import folder_paths

    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    try:
        return tuple(nodes_by_id["ProLoRATransferLoRAFiles"].execute(
            source_model="diffusion_models/wan21.safetensors", target_model=target, more_targets=more_targets, lora_name="wan_style.safetensors",
            more_loras="", mode=mode, subspace_rank=0, threshold=0.0, pairing="name", filename_pattern="{lora}__to_{target}",
            device="cpu").args)  # type: ignore[return-value]
    finally:
        for folder in ("diffusion_models", "loras"):
            folder_paths.folder_names_and_paths[folder][0].remove(str(root / folder))


def test_files_node_transfers_one_wan21_lora_to_both_wan22_experts(nodes_by_id: dict[str, Any], wan_files: dict,
                                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    root, m = wan_files["root"], wan_files["models"]
    names, report = _files_node(nodes_by_id, root, "diffusion_models/wan22_high.safetensors", "diffusion_models/wan22_low.safetensors\n")
    assert names.splitlines() == ["wan_style__to_wan22_high.safetensors", "wan_style__to_wan22_low.safetensors"], names
    assert f"bases computed {2 * N_WAN}, from cache 0" in report and f"bases computed {N_WAN}, from cache {N_WAN}" in report, report
    try:
        for name, e in zip(names.splitlines(), ("high", "low")):
            check_against_reference(wan_files["lora"], "wan-musubi", m["src"], m[e], load_file(str(root / "loras" / name)), "prolora")
    finally:
        for name in names.splitlines():
            (root / "loras" / name).unlink()


# --------------------------------------------------------------------------------------
# Shapes that cannot match: one message naming both detected models
# --------------------------------------------------------------------------------------

def _expect_one_message(msg: str, wan_files: dict) -> None:
    m = wan_files["models"]
    big, small = (f"{fm.parameter_count(m[k]) / 1e6:.2f} M parameters" for k in ("src", "small"))
    assert f"the source model is WAN21_T2V ({big}, dim 64) and the target model is WAN21_T2V ({small}, dim 32)" in msg, msg
    assert f"none of the LoRA's {N_WAN} modules has a weight of its shape" in msg and "shapes differ: this method needs same-shape models" in msg


def test_cli_wan14b_onto_wan13b_gives_one_message(wan_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = wan_files["paths"]
    rc, stdout, err = run_main(["transfer", "--source-base", p["src"], "--target-base", p["small"], "--lora", wan_files["lora_path"],
                                "--out-dir", tmp_path, "--no-cache", "--device", "cpu"], capsys)
    assert rc == 2 and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    _expect_one_message(err, wan_files)
    assert not list(tmp_path.glob("*.safetensors")), "nothing is written"


def test_files_node_wan14b_onto_wan13b_gives_one_message(nodes_by_id: dict[str, Any], wan_files: dict, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Exception) as info:
        _files_node(nodes_by_id, wan_files["root"], "diffusion_models/wan13.safetensors")
    assert type(info.value).__name__ == "ProLoRAError", info.value  # the pack's own copy of the class: matched by name
    _expect_one_message(str(info.value), wan_files)


# --------------------------------------------------------------------------------------
# Text encoders carried by a checkpoint (SD1.5 ``cond_stage_model.…``)
# --------------------------------------------------------------------------------------

def _clip_weights(clip: Any, patched: bool) -> dict[str, torch.Tensor]:
    """A ``CLIP``'s text-encoder weights (``clip_l.…``), with its patches applied by ComfyUI's own
    ``calculate_weight`` when ``patched``."""
    import comfy.lora

    out = {}
    for key, entry in clip.patcher.get_key_patches("clip_l.").items():
        w = entry[0][1](entry[0][0].detach().to("cpu", torch.float32, copy=True))
        out[key] = comfy.lora.calculate_weight(entry[1:], w, key) if patched and len(entry) > 1 else w
    return out


def _sd15_checkpoint(unet: Any, clip: Any, path: Path) -> Path:
    """A checkpoint in ComfyUI's saving layout: ``model.diffusion_model.…`` and the text encoder under
    ``cond_stage_model.…`` (the model config's ``process_clip_state_dict_for_saving``)."""
    comfy_host.save_model_state(unet, path)
    tensors = load_file(str(path))
    with open(path, "rb") as f:  # keep the model's metadata
        import json as _json
        header = _json.loads(f.read(int.from_bytes(f.read(8), "little")))
    te = unet.model.model_config.process_clip_state_dict_for_saving(dict(clip.cond_stage_model.state_dict()))
    tensors.update({k: v.detach().float().contiguous() for k, v in te.items()})
    save_file(tensors, str(path), metadata=header["__metadata__"])
    return path


def test_cli_transfers_the_text_encoder_part_a_checkpoint_carries(comfyui: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kohya LoRA with UNet and ``lora_te_`` modules between two SD1.5-layout checkpoints that carry
    their text encoders: every module is placed through ComfyUI's unet and clip key maps, and the
    ``copy`` output changes UNet and text-encoder weights exactly as the input does under ComfyUI's
    loader (``comfy.sd.load_lora_for_models``)."""
    import comfy.sd

    src_unet = comfy_host.tiny_sd15_model(0)
    tgt_unet = comfy_host.perturbed_copy(src_unet, 0.05, seed=3)
    src_clip, tgt_clip = comfy_host.tiny_clip(0), comfy_host.tiny_clip(1)
    s = _sd15_checkpoint(src_unet, src_clip, tmp_path / "sd15_src.safetensors")
    t = _sd15_checkpoint(tgt_unet, tgt_clip, tmp_path / "sd15_tgt.safetensors")
    unet_mods = sorted(k[len("diffusion_model."):-len(".weight")] for k in src_unet.model.state_dict() if k.endswith("attn1.to_q.weight"))[:2]
    lora = comfy_host.kohya_lora(src_unet, unet_mods, seed=4)
    gen = torch.Generator().manual_seed(5)
    clip_sd = src_clip.cond_stage_model.state_dict()
    te = {"self_attn_q_proj": "self_attn.q_proj", "mlp_fc1": "mlp.fc1"}
    for short, mod in te.items():
        m, n = clip_sd[f"clip_l.transformer.text_model.encoder.layers.0.{mod}.weight"].shape
        name = f"lora_te_text_model_encoder_layers_0_{short}"
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn(4, n, generator=gen), 0.1 * torch.randn(m, 4, generator=gen)
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    lora_path = tmp_path / "style.safetensors"
    save_file(lora, str(lora_path))
    out = tmp_path / "out.safetensors"
    rc, stdout, err = run_main(["transfer", "--source-base", s, "--target-base", t, "--lora", lora_path, "--out", out, "--mode", "copy",
                                "--no-cache", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "style.safetensors: 4 modules\n  4 transferred" in stdout and "text-encoder" not in err, stdout + err
    got = load_file(str(out))
    assert {f"lora_te_text_model_encoder_layers_0_{k}.lora_up.weight" for k in te} <= set(got), sorted(got)

    def apply(lora_sd: dict) -> tuple[dict, dict]:
        model, clip = comfy.sd.load_lora_for_models(tgt_unet, tgt_clip, lora_sd, 1.0, 1.0)
        return comfy_host.unet_weights(model, patched=True), _clip_weights(clip, patched=True)

    (want_u, want_c), (got_u, got_c) = apply(lora), apply(got)
    before_c = _clip_weights(tgt_clip, patched=False)
    assert sum(not torch.equal(want_c[k], before_c[k]) for k in want_c) == 2, "the input changes two text-encoder weights"
    for want, have in ((want_u, got_u), (want_c, got_c)):
        for k in want:
            torch.testing.assert_close(have[k], want[k], rtol=1e-6, atol=1e-7)


def test_sdxl_text_encoders_map_as_comfyuis_checkpoint_loader_loads_them(comfyui: Any, tmp_path: Path) -> None:
    """SDXL checkpoints keep CLIP-L as ``conditioner.embedders.0.transformer.…`` and OpenCLIP-G as
    ``conditioner.embedders.1.model.…`` with q, k and v fused in ``attn.in_proj_weight``.

    Full size, on the meta device (ComfyUI's own ``SDXLClipModel``, saved by the config's
    ``process_clip_state_dict_for_saving``): kohya ``lora_te1_``/``lora_te2_`` and diffusers
    ``text_encoder_2.`` names map onto the file's keys, q/k/v onto row slices of ``in_proj_weight``.
    With values (one block at toy width): every mapped weight, served from the file as the core serves
    a slice, equals the tensor ComfyUI's checkpoint loader (``process_clip_state_dict``) loads under
    the key ComfyUI's clip key map gives that LoRA name."""
    import comfy.lora
    import comfy.supported_models
    import prolora_host
    from prolora_core.slices import SlicedWeights
    from prolora_core.weights import open_weights

    config = comfy.supported_models.SDXL(dict(comfy.supported_models.SDXL.unet_config))
    full = config.clip_target().clip(device=torch.device("meta"), dtype=torch.float16).state_dict()
    saved = config.process_clip_state_dict_for_saving(dict(full))
    key_map = prolora_host.text_encoder_key_map(config, {k: torch.empty(v.shape, device="meta") for k, v in saved.items()},
                                                "model.diffusion_model.")
    g_attn = "conditioner.embedders.1.model.transformer.resblocks.{}.attn.in_proj_weight[0:{}:1280]"
    assert key_map["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for i, proj in enumerate(("q", "k", "v")):
        assert key_map[f"lora_te2_text_model_encoder_layers_5_self_attn_{proj}_proj"] == g_attn.format(5, 1280 * i)
        assert key_map[f"text_encoder_2.text_model.encoder.layers.31.self_attn.{proj}_proj"] == g_attn.format(31, 1280 * i)
    assert key_map["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    assert sum(k.startswith("lora_te2_") for k in key_map) == 32 * 6 and sum(k.startswith("lora_te1_") for k in key_map) == 12 * 6

    gen = torch.Generator().manual_seed(0)
    g, l_ = "conditioner.embedders.1.model.transformer.resblocks.0.", "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
    small = {g + "attn.in_proj_weight": torch.randn(24, 8, generator=gen), g + "attn.in_proj_bias": torch.randn(24, generator=gen),
             g + "attn.out_proj.weight": torch.randn(8, 8, generator=gen), g + "mlp.c_fc.weight": torch.randn(32, 8, generator=gen),
             l_ + "self_attn.q_proj.weight": torch.randn(8, 8, generator=gen), l_ + "mlp.fc2.weight": torch.randn(8, 32, generator=gen)}
    path = tmp_path / "sdxl_te.safetensors"
    save_file(small, str(path))
    weights = SlicedWeights(open_weights(path))
    small_map = prolora_host.text_encoder_key_map(config, {k: torch.empty(v.shape, device="meta") for k, v in small.items()}, "model.diffusion_model.")
    loaded = config.process_clip_state_dict(dict(small))  # what ComfyUI's checkpoint loader puts into the text-encoder model
    comfy_map = comfy.lora.model_lora_keys_clip(type("TE", (), {"state_dict": staticmethod(lambda: loaded)})(), {})
    assert len(small_map) >= 6 and set(small_map) <= set(comfy_map)
    for name, key in small_map.items():
        torch.testing.assert_close(weights.get(key), loaded[comfy_map[name]], rtol=0, atol=0, msg=name)


def test_cli_default_bases_give_an_sd15_lora_back_when_the_target_is_the_source(comfyui: Any, tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``prolora-full`` with the default (auto, float32, cached) bases and target = source must change
    the model as the input does under ComfyUI's loader, every Φ ≤ 1. SD1.5's square ``time_embed.2``
    (128 × 128 in the tiny model, k = 32) once got a non-orthonormal randomized V: Φ_V ≈ 11 and a
    LoRA 159× too strong."""
    unet = comfy_host.tiny_sd15_model(0)
    base = tmp_path / "sd15.safetensors"
    comfy_host.save_model_state(unet, base)
    mods = ["time_embed.0", "time_embed.2", "input_blocks.1.0.emb_layers.1"]
    lora = comfy_host.kohya_lora(unet, mods, rank=2, seed=4)
    lora_path, out, report = tmp_path / "style.safetensors", tmp_path / "out.safetensors", tmp_path / "report.json"
    save_file(lora, str(lora_path))
    rc, _, err = run_main(["transfer", "--source-base", base, "--target-base", base, "--lora", lora_path, "--out", out,
                           "--report", report, "--cache-dir", tmp_path / "cache", "--device", "cpu"], capsys)
    assert rc == 0, err
    rows = read_report(report)["modules"]
    assert len(rows) == 3 and all(r["transferred"] for r in rows), rows
    for r in rows:
        assert r["similarity_u"] <= 1 + 1e-4 and r["similarity_v"] <= 1 + 1e-4, r
    want = comfy_host.applied_by_comfyui(unet, lora)
    got = comfy_host.applied_by_comfyui(unet, load_file(str(out)))
    before = comfy_host.unet_weights(unet, patched=False)
    comfy_host.assert_same_change(before, want, got, rel=1e-3)
