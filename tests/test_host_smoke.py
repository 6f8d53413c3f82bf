"""Smoke tests for the development harness (``prolora_dev``, tests/conftest.py, tests/comfy_host.py).

They prove the harness drives the REAL host: in-process sampling with tiny SD1.5/SDXL
UNets, ComfyUI's own LoRA key mapping and patching, a tiny CLIP, the tiny-model file
format (one writer, the pack's reader), the pack imported under its own name next to
ComfyUI's ``nodes``, and a real server subprocess with our pack in its custom_nodes/.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import comfy_host
from comfy_host import ComfyServer, PromptRejected

MODEL_BUILDERS = {"SD15": comfy_host.tiny_sd15_model, "SDXL": comfy_host.tiny_sdxl_model}


# ----------------------------------------------------------------------------- in-process


def test_sys_path_puts_comfyui_first_and_repo_last(comfyui: Any) -> None:
    import comfy.cli_args
    import comfy.model_management
    import prolora_core

    assert Path(comfyui.__file__).resolve().parent == comfy_host.COMFYUI_DIR.resolve()  # ComfyUI's nodes.py, not ours
    assert Path(prolora_core.__file__).resolve().parent == comfy_host.REPO_ROOT / "prolora_core"
    # (nodes.py itself puts .comfyui/comfy in front later, as it does in the real host)
    site_packages = [i for i, p in enumerate(sys.path) if p.endswith("site-packages")]
    assert sys.path.index(str(comfy_host.COMFYUI_DIR)) < min(site_packages)
    assert sys.path.index(str(comfy_host.REPO_ROOT)) > max(site_packages)
    assert comfy.cli_args.args.cpu is True
    assert comfy.model_management.get_torch_device() == torch.device("cpu")


@pytest.mark.parametrize("kind", ["SD15", "SDXL"])
def test_tiny_model_samples_deterministically(comfyui: Any, kind: str) -> None:
    model = MODEL_BUILDERS[kind](0)
    positive = comfy_host.tiny_conditioning(model, seed=1)
    negative = comfy_host.tiny_conditioning(model, seed=2)

    out = comfy_host.sample_step(model, positive, negative, seed=3)
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() > 0

    same = comfy_host.sample_step(MODEL_BUILDERS[kind](0), positive, negative, seed=3)
    torch.testing.assert_close(same, out, rtol=0, atol=0)

    other_seed = comfy_host.sample_step(MODEL_BUILDERS[kind](1), positive, negative, seed=3)
    assert (other_seed - out).abs().max() > 1e-3

    patched = model.clone()  # a ComfyUI "diff" patch on the output conv changes the result
    out_w = "diffusion_model.out.2.weight"
    assert patched.add_patches({out_w: ("diff", (torch.ones_like(model.model.state_dict()[out_w]) * 0.1,))}) == [out_w]
    assert (comfy_host.sample_step(patched, positive, negative, seed=3) - out).abs().max() > 1e-3
    torch.testing.assert_close(comfy_host.sample_step(model, positive, negative, seed=3), out)  # original untouched


@pytest.mark.parametrize("kind", ["Flux", "Chroma"])
def test_tiny_dit_runs_a_forward_pass(comfyui: Any, kind: str) -> None:
    """The tiny Flux and Chroma (what the Tiny Model node offers) run through ComfyUI's own
    ``apply_model``: their configs are consistent (Chroma's approximator writes ``hidden_size``-wide
    modulation vectors, its ``img_in`` reads the patched latent)."""
    from prolora_dev.tiny_models import CHROMA_UNET_CONFIG, FLUX_UNET_CONFIG, build_model

    config = FLUX_UNET_CONFIG if kind == "Flux" else CHROMA_UNET_CONFIG
    model = build_model(kind, config, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 3, config["context_in_dim"], generator=gen)
    extra = {"y": torch.randn(1, config["vec_in_dim"], generator=gen)} if kind == "Flux" else {}
    out = model.model.apply_model(x, torch.tensor([0.5]), c_crossattn=context, guidance=torch.tensor([1.0]), **extra)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("kind", ["SD15", "SDXL"])
def test_kohya_lora_keys_map_and_patch_the_tiny_unet(comfyui: Any, kind: str) -> None:
    import comfy.lora
    import comfy.sd

    model = MODEL_BUILDERS[kind](0)
    weights = model.model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})  # always pass a fresh dict: the default is shared
    # unet_to_diffusers also emits names for layers these (and real) UNets lack: shortcut convs of
    # same-width resnets, the last level's down/upsampler, SD1.5's label_emb. Only those may dangle.
    dangling = {target for target in key_map.values() if target not in weights}
    assert all(re.search(r"(skip_connection|\.0\.op|label_emb\.0\.\d|output_blocks\.\d+\.\d\.conv)\.weight$", t) for t in dangling), dangling
    for key in weights:
        if key.endswith(".weight"):
            assert key_map["lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")] == key

    # a diffusers-named kohya key (what real SD1.5/SDXL LoRAs use) for the first cross-attention q
    block = "down_blocks_0" if kind == "SD15" else "down_blocks_1"
    lora_name = f"lora_unet_{block}_attentions_0_transformer_blocks_0_attn2_to_q"
    target = key_map[lora_name]
    assert target.endswith("transformer_blocks.0.attn2.to_q.weight") and target.startswith("diffusion_model.input_blocks.")

    out_f, in_f = weights[target].shape
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn((4, in_f), generator=gen), torch.randn((out_f, 4), generator=gen)
    lora = {f"{lora_name}.lora_down.weight": down, f"{lora_name}.lora_up.weight": up, f"{lora_name}.alpha": torch.tensor(2.0)}
    patched_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0.0)

    after = comfy_host.unet_weights(patched_model, patched=True)[target]
    torch.testing.assert_close(after, weights[target] + 0.5 * (2.0 / 4) * (up @ down), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comfy_host.unet_weights(patched_model)[target], weights[target])


def test_tiny_clip_encodes_and_conditions_the_tiny_sd15(comfyui: Any) -> None:
    import comfy.lora

    clip = comfy_host.tiny_clip(0)
    (cond,) = comfyui.CLIPTextEncode().encode(clip, "a photo of a cat")
    tensor, extra = cond[0]
    assert tensor.shape == (1, 77, comfy_host.SD15_UNET_CONFIG["context_dim"]) and torch.isfinite(tensor).all()
    assert extra["pooled_output"].shape == (1, comfy_host.TINY_CLIP_CONFIG["hidden_size"])
    (other,) = comfyui.CLIPTextEncode().encode(clip, "a painting of a dog")
    assert (other[0][0] - tensor).abs().max() > 1e-4

    out = comfy_host.sample_step(comfy_host.tiny_sd15_model(0), cond, other, seed=0)
    assert torch.isfinite(out).all()

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    q0 = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert key_map["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == q0
    assert key_map["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == q0


def test_tiny_model_file_roundtrip_through_the_packs_reader(comfyui: Any, tmp_path: Path) -> None:
    import safetensors

    from prolora_dev import tiny_models

    model = comfy_host.tiny_sdxl_model(5)
    path = tiny_models.save_tiny_model(model, tmp_path / "tiny_sdxl.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())
        assert f.metadata()["prolora.model_kind"] == "SDXL"
    rebuilt = tiny_models.load_tiny_model(path)
    assert rebuilt.model.model_config.unet_config == model.model.model_config.unet_config
    torch.testing.assert_close(comfy_host.unet_weights(rebuilt), comfy_host.unet_weights(model), rtol=0, atol=0)

    # a bare diffusion-model file in float16 (the zoo's dtype) reads back as the rounded weights
    half = tiny_models.save_tiny_model(model, tmp_path / "bare.safetensors", prefix="", dtype=torch.float16, extra_meta={"x": "1"})
    got, want = comfy_host.unet_weights(tiny_models.load_tiny_model(half)), comfy_host.unet_weights(model)
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)

    # the reader is the pack's own (what Load Tiny Model runs): a file without the metadata is its ProLoRAError
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(plain))
    with pytest.raises(Exception, match="not a ProLoRA tiny model") as err:
        tiny_models.load_tiny_model(plain)
    assert type(err.value).__name__ == "ProLoRAError" and str(plain) in str(err.value)


def test_pack_loads_under_its_own_name_next_to_comfyuis_nodes(comfyui: Any) -> None:
    import nodes
    import scripts.workflows

    from prolora_dev import host

    pack = host.load_pack()
    assert pack.__name__ == host.comfy_module_name(host.REPO_ROOT)
    tiny = host.pack_module("nodes.tiny_model_node")
    assert tiny.__name__ == f"{pack.__name__}.nodes.tiny_model_node"
    assert Path(tiny.__file__).resolve() == host.REPO_ROOT / "nodes" / "tiny_model_node.py"
    assert nodes is comfyui and Path(nodes.__file__).resolve().parent == host.COMFYUI_DIR.resolve()  # ComfyUI's nodes.py
    assert Path(scripts.workflows.__file__).resolve() == host.REPO_ROOT / "scripts" / "workflows.py"


def test_no_sys_path_rewriting_outside_the_host_set_up() -> None:
    """Tests, evidence, scripts and benchmarks import each other as packages from the repo root;
    only ``prolora_dev/host.py`` orders ``sys.path`` (ComfyUI first, documented there)."""
    rewrite = re.compile(r"sys\.path\s*(\.(append|insert|extend|remove)\s*\(|\[[^\]]*\]\s*=|\s*[+]?=)")
    offenders = []
    for folder in ("tests", "evidence", "scripts", "bench", "prolora_dev", "nodes", "prolora_core"):
        for path in sorted((comfy_host.REPO_ROOT / folder).rglob("*.py")):
            if "node_modules" in path.parts or path == comfy_host.REPO_ROOT / "prolora_dev" / "host.py":
                continue
            offenders += [f"{path.relative_to(comfy_host.REPO_ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                          if rewrite.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []
    assert rewrite.search((comfy_host.REPO_ROOT / "prolora_dev" / "host.py").read_text())  # the one place (the pattern matches it)


def test_zoo_conventions_match_the_shipped_zoo() -> None:
    """The pack's demo nodes and the evidence study share ``prolora_core.zoo``; the shipped
    conditioning file was written with those prompts, in that order."""
    import safetensors

    from prolora_core import zoo

    with safetensors.safe_open(str(zoo.zoo_file("conditioning")), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == [*zoo.CLASSES, "<empty prompt>"]
        assert f.get_slice("context").get_shape()[0] == len(zoo.CLASSES) + 1
    for name in zoo.MODELS.values():
        with safetensors.safe_open(str(zoo.zoo_file(name)), framework="pt") as f:
            assert f.metadata()["prolora.model_kind"] == "SD15", name
    for lora in zoo.LORAS:
        assert zoo.zoo_file(f"lora_{lora}_source").is_file()


def test_load_pack_imports_a_package_like_comfyui(tmp_path: Path) -> None:
    pack = tmp_path / "throwaway-pack"
    (pack / "sub").mkdir(parents=True)
    (pack / "__init__.py").write_text("from .sub.values import VALUE\nNODE_CLASS_MAPPINGS = {}\n")
    (pack / "sub" / "__init__.py").write_text("")
    (pack / "sub" / "values.py").write_text("from .. import __name__ as PARENT\nVALUE = ('ok', PARENT)\n")

    module = comfy_host.load_pack(pack)
    name = comfy_host.comfy_module_name(pack)
    assert sys.modules[name] is module and module.VALUE == ("ok", name)
    assert comfy_host.load_pack(pack) is module
    assert f"{name}.sub.values" in sys.modules


def test_pack_import_error_parser_ignores_other_modules() -> None:
    pack = "/b/custom_nodes/comfyui-prolora"
    ok_log = ("Cannot import /c/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'\n"
              f"Import times for custom nodes:\n   0.1 seconds: {pack}\n\nIMPORT FAILED: nodes_audio.py\nStarting server\n")
    assert comfy_host.pack_import_errors(ok_log, pack) == []
    bad_log = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nImportError: boom\n"
               f"Cannot import {pack} module for custom nodes: boom\n   0.0 seconds (IMPORT FAILED): {pack}\nStarting server\n")
    errors = comfy_host.pack_import_errors(bad_log, pack)
    assert errors[0].startswith("Traceback") and any("IMPORT FAILED" in e for e in errors)


# ----------------------------------------------------------------------------- real server


@pytest.mark.server
def test_server_lists_core_nodes_and_tried_our_pack(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    for node in ("KSampler", "LoraModelLoader", "SaveLoRA", "EmptyLatentImage", "SaveLatent"):
        assert node in info, node
    assert comfy_server.pack_import_line() is not None, comfy_server.log_tail()
    assert comfy_server.url.startswith("http://127.0.0.1:")


@pytest.mark.server
def test_server_runs_a_prompt_and_survives_a_malformed_one(comfy_server: ComfyServer) -> None:
    workflow = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/smoke"}},
    }
    entry = comfy_server.run(workflow, timeout=60)
    saved = entry["outputs"]["2"]["latents"][0]
    assert (comfy_server.base_dir / "output" / saved["subfolder"] / saved["filename"]).is_file()

    with pytest.raises(PromptRejected) as unknown:
        comfy_server.post_prompt({"1": {"class_type": "NoSuchNodeClass", "inputs": {}}})
    assert unknown.value.status == 400 and "error" in unknown.value.response

    broken = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16}},  # height/batch_size missing
              "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/bad"}}}
    with pytest.raises(PromptRejected) as missing:
        comfy_server.post_prompt(broken)
    assert "1" in missing.value.response.get("node_errors", {})

    workflow["1"]["inputs"]["width"] = 24  # a new input, so the cache cannot skip the run
    assert comfy_server.run(workflow, timeout=60)["status"]["status_str"] == "success"
