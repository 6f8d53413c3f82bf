"""The file-to-file path on every family's real key layout: the CLI and the Transfer LoRA (files) node.

For each family a tiny model of ComfyUI's own class and a fine-tuned-like descendant are written as
the files people have: a diffusion-model file (bare keys, ``double_blocks.0.img_attn.qkv.weight``) or
a full checkpoint (``model.diffusion_model.`` prefix), with the family's real key names and layout at
toy width. A LoRA in a layout a trainer writes for that family is transferred with ``--mode copy``
(and through the files node), and the output, loaded by ComfyUI's own loader onto the target,
changes every weight exactly as the input does (``copy`` parity), with no key ComfyUI leaves unloaded.

Detection: Wan 2.1, Qwen-Image and HunyuanVideo files are plain safetensors without any metadata, so
the family and the model object whose key map is used are what ComfyUI's detection
(``comfy.model_detection`` on the file's shapes) gives, checked against the model's class; Wan and
HunyuanVideo are built at the smallest widths detection accepts (one 128-wide head). The others
ComfyUI detects only at real sizes: Flux and Chroma are recognised but built with Flux.1's fixed 24
heads of 128 (hidden 3072), SD1.5, SDXL and SD3 give "no match" below their real channel and context
widths, and a Z-Image below ``dim`` 3840 is taken for Lumina2. Their tiny files carry the pack's
``prolora.unet_config`` metadata (``prolora_dev.tiny_models``), which names the class; the key names
and layout are still the real ones.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_host
import family_models as fm
import test_family_flux as flux
import test_family_wan_qwen as wq
from fixtures_files import read_report, run_main

pytestmark = pytest.mark.usefixtures("comfyui")

CKPT = "model.diffusion_model."


def _sd_lora(model: Any, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A kohya LoRA (``lora_unet_…``) on the first linear module ending in each suffix."""
    keys = sorted(k[len("diffusion_model."):-len(".weight")] for k, v in model.model.state_dict().items()
                  if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2)
    mods = [next(k for k in keys if k.endswith(s)) for s in suffixes]
    return comfy_host.kohya_lora(model, mods, seed=4)


def _chroma_kohya(model: Any) -> dict[str, torch.Tensor]:
    """Kohya names on Chroma's blocks (no modulation layers: Chroma has none)."""
    names = [n for n in flux.KOHYA if "mod" not in n]
    return comfy_host.factor_lora({n: flux.module_shape(model, n) for n in names}, peft=False, rank=4, alpha=2.0, seed=7)


def _chroma_pair() -> tuple[Any, Any]:
    chroma = comfy_host.tiny_chroma_from(comfy_host.tiny_flux_model(0), 0.05, seed=1)
    return chroma, comfy_host.perturbed_copy(chroma, 0.05, seed=12)


def _pair(build: Callable[[], Any]) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        src = build()
        return src, comfy_host.perturbed_copy(src, 0.05, seed=11)
    return make


def _family_pair(family: str) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        src = fm.tiny_model(family)
        return src, fm.descendant(src, 0.05, seed=11)
    return make


#: Wan 2.1 and HunyuanVideo at the smallest widths ComfyUI's detection builds from a file's shapes:
#: it takes 128-wide heads (``num_heads = dim // 128``), Wan's ``freq_dim`` 256 and ``text_dim`` 4096
#: (not read from the file) and HunyuanVideo's ``vec_in_dim`` 768 and ``axes_dim`` [16, 56, 56].
WAN_DETECTABLE = {**fm.WAN14_CONFIG, "dim": 128, "ffn_dim": 256, "num_heads": 1, "freq_dim": 256, "text_dim": 4096}
HUNYUAN_DETECTABLE = {**fm.HUNYUAN_VIDEO_CONFIG, "hidden_size": 128, "num_heads": 1, "vec_in_dim": 768, "axes_dim": [16, 56, 56]}


def _detectable_pair(kind: str, config: dict[str, Any]) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        src = comfy_host.build_model(kind, config, seed=0)
        gen = torch.Generator().manual_seed(1000)
        with torch.no_grad():
            for _, buf in sorted(src.model.diffusion_model.named_buffers(), key=lambda kv: kv[0]):
                if torch.is_floating_point(buf):
                    buf.copy_(0.02 * torch.randn(buf.shape, generator=gen))
        return src, fm.descendant(src, 0.05, seed=11)
    return make


@dataclass(frozen=True)
class Case:
    """One family's files: models, the LoRA in a trainer's layout, the key prefix of the files
    (``""``: a diffusion-model file), and whether ComfyUI detects the tiny file from its shapes."""
    models: Callable[[], tuple[Any, Any]]
    lora: Callable[[Any], dict[str, torch.Tensor]]
    prefix: str
    detected_from_shapes: bool


CASES: dict[str, Case] = {
    "sd15-checkpoint-kohya": Case(_pair(lambda: comfy_host.tiny_sd15_model(0)),
                                  lambda m: _sd_lora(m, ("attn1.to_q", "attn2.to_k", "ff.net.0.proj")), CKPT, False),
    "sdxl-checkpoint-kohya": Case(_pair(lambda: comfy_host.tiny_sdxl_model(0)),
                                  lambda m: _sd_lora(m, ("attn1.to_q", "attn2.to_v", "ff.net.2", "proj_in")), CKPT, False),
    "flux-diffusion-model-diffusers": Case(_pair(lambda: comfy_host.tiny_flux_model(0)), lambda m: flux.make_lora(m, "diffusers", seed=6), "", False),
    "flux-checkpoint-kohya": Case(_pair(lambda: comfy_host.tiny_flux_model(0)), lambda m: flux.make_lora(m, "kohya", seed=6), CKPT, False),
    "flux-checkpoint-onetrainer": Case(_pair(lambda: comfy_host.tiny_flux_model(0)), lambda m: flux.make_lora(m, "onetrainer", seed=6), CKPT, False),
    "chroma-diffusion-model-kohya": Case(_chroma_pair, _chroma_kohya, "", False),
    "wan21-diffusion-model-peft": Case(_detectable_pair("WAN21_T2V", WAN_DETECTABLE), lambda m: wq.make_lora(m, "wan-comfy-peft", seed=5), "", True),
    "wan21-checkpoint-musubi-mod": Case(_detectable_pair("WAN21_T2V", WAN_DETECTABLE), lambda m: wq.make_lora(m, "wan-musubi-mod", seed=5),
                                        CKPT, True),
    "qwen-image-diffusion-model-diffusers": Case(_family_pair("qwen_image"), lambda m: wq.make_lora(m, "qwen-diffusers-mod", seed=5), "", True),
    "sd3-checkpoint-diffusers": Case(_family_pair("sd3"), lambda m: wq.make_lora(m, "sd3-diffusers", seed=5), CKPT, False),
    "z-image-diffusion-model-diffusers": Case(_family_pair("z_image"), lambda m: wq.make_lora(m, "zimage-diffusers", seed=5), "", False),
    "hunyuan-video-diffusion-model-diffusion-pipe": Case(_detectable_pair("HunyuanVideo", HUNYUAN_DETECTABLE),
                                                         lambda m: wq.make_lora(m, "hunyuan-diffusion-pipe", seed=5), "", True),
}


def write_base(model: Any, path: Path, prefix: str, with_config: bool) -> Path:
    """The model's diffusion-model weights under ``prefix``: a plain safetensors file (what ComfyUI's
    detection reads), or the pack's tiny-model file whose metadata names the class."""
    if with_config:
        return comfy_host.save_model_state(model, path, prefix=prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k[len("diffusion_model."):]: v.contiguous() for k, v in comfy_host.unet_weights(model).items()}, str(path))
    return path


@pytest.fixture(scope="module", params=list(CASES))
def layout_files(request: pytest.FixtureRequest, comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src, tgt = case.models()
    folder = root / ("checkpoints" if case.prefix else "diffusion_models")
    s = write_base(src, folder / "base.safetensors", case.prefix, not case.detected_from_shapes)
    t = write_base(tgt, folder / "tuned.safetensors", case.prefix, not case.detected_from_shapes)
    lora = case.lora(src)
    (root / "loras").mkdir()
    save_file(lora, str(root / "loras" / "style.safetensors"))
    yield {"case": case, "root": root, "src": s, "tgt": t, "target": tgt, "lora": lora, "lora_path": root / "loras" / "style.safetensors",
           "kind": type(src.model.model_config).__name__, "modules": len({k.split(".lora_")[0].removesuffix(".alpha") for k in lora})}


def check_copy_parity(files: dict[str, Any], out: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture) -> None:
    """The output loads with ComfyUI's own loader onto the target (no key left unloaded) and changes
    every weight exactly as the input does."""
    tgt = files["target"]
    before = comfy_host.unet_weights(tgt)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        want, got = comfy_host.applied_by_comfyui(tgt, files["lora"]), comfy_host.applied_by_comfyui(tgt, out)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], [r.getMessage() for r in caplog.records][:3]
    changed = [k for k in before if not torch.equal(want[k], before[k])]
    assert changed, "the input LoRA changes the target"
    assert [k for k in before if not torch.equal(got[k], before[k])] == changed
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_cli_on_the_familys_real_layout(layout_files: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    f = layout_files
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    rc, stdout, err = run_main(["transfer", "--source-base", f["src"], "--target-base", f["tgt"], "--lora", f["lora_path"], "--out", out,
                                "--mode", "copy", "--no-cache", "--device", "cpu", "--report", report], capsys)
    assert rc == 0, err
    assert f"style.safetensors: {f['modules']} modules\n  {f['modules']} transferred" in stdout, stdout
    # the family ComfyUI detected (from the file's shapes where it can) is the model's own class
    assert read_report(report)["summary"]["key_map"] == f"ComfyUI's key map for {f['kind']}"
    got = load_file(str(out))
    assert {k.split(".lora_")[0].removesuffix(".alpha") for k in got} == {k.split(".lora_")[0].removesuffix(".alpha") for k in f["lora"]}
    check_copy_parity(f, got, caplog)


def test_files_node_on_the_familys_real_layout(nodes_by_id: dict[str, Any], layout_files: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import folder_paths

    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    f = layout_files
    root, folder = f["root"], f["src"].parent.name
    for name in (folder, "loras"):
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    try:
        names, report = comfy_host.run_node(nodes_by_id, "ProLoRATransferLoRAFiles", source_model=f"{folder}/base.safetensors",
                                            target_model=f"{folder}/tuned.safetensors", more_targets="", lora_name="style.safetensors",
                                            more_loras="", mode="copy", subspace_rank=0, threshold=0.0, pairing="name",
                                            filename_pattern="{lora}__to_{target}", device="cpu")
    finally:
        for name in (folder, "loras"):
            folder_paths.folder_names_and_paths[name][0].remove(str(root / name))
    assert f"style.safetensors: {f['modules']} modules\n  {f['modules']} transferred" in report, report
    assert names.strip() == "style__to_tuned.safetensors", names
    out_path = root / "loras" / names.strip()
    try:
        check_copy_parity(f, load_file(str(out_path)), caplog)
    finally:
        out_path.unlink()
