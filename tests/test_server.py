"""The pack inside a real ComfyUI server: /object_info, a full transfer-and-sample workflow through
/prompt, the files node feeding core LoraLoaderModelOnly, and a malformed workflow."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import save_file

import comfy_host

pytestmark = pytest.mark.server

MODULES = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.2"]
OUR_NODES = ["ProLoRAComputeBasis", "ProLoRAMatchModules", "ProLoRAProjectLoRA", "ProLoRALoadLoRA", "ProLoRASaveLoRA", "ProLoRAApplyLoRA",
             "ProLoRATransferLoRAFiles", "ProLoRACache", "ProLoRATinyModelLoader", "ProLoRATinyConditioning"]


@pytest.fixture(scope="module")
def server(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_host.ComfyServer]:
    """A real server whose models/ already holds tiny SD1.5 source/target models and LoRAs."""
    base = comfy_host.prepare_base_dir(tmp_path_factory.mktemp("server_base"))
    src = comfy_host.save_tiny_pair(base / "models", target_seed=9)
    save_file(comfy_host.kohya_lora(src, MODULES, seed=1), str(base / "models" / "loras" / "style.safetensors"), metadata={"ss_tag_frequency": "{}"})
    save_file(comfy_host.kohya_lora(src, MODULES[:2], seed=2), str(base / "models" / "loras" / "concept.safetensors"))
    sdxl = comfy_host.tiny_sdxl_model(0)
    sdxl_mod = next(k[len("diffusion_model."):-len(".weight")] for k in sdxl.model.state_dict() if k.endswith("attn2.to_k.weight"))
    bad = comfy_host.kohya_lora(sdxl, [sdxl_mod], seed=3)
    bad = {k.replace("lora_unet_" + sdxl_mod.replace(".", "_"), "lora_unet_" + MODULES[0].replace(".", "_")): v for k, v in bad.items()}
    save_file(bad, str(base / "models" / "loras" / "for_sdxl.safetensors"))
    _bad_lora_files(base / "models" / "loras", comfy_host.kohya_lora(src, MODULES, seed=4))
    server = comfy_host.start_comfy_server(base)
    yield server
    server.stop()


def _bad_lora_files(folder: Path, good: dict[str, torch.Tensor]) -> None:
    """The main kinds of the bad-input corpus, as files in models/loras (see BAD_LORAS)."""
    import argparse

    save_file(good, str(folder / "good_for_bad.safetensors"))
    data = (folder / "good_for_bad.safetensors").read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "bad_header.safetensors").write_bytes(len(b"{not json").to_bytes(8, "little") + b"{not json" + b"\0" * 64)
    (folder / "bad_text.safetensors").write_text("this is a text file, not a LoRA\n")
    (folder / "bad_empty.safetensors").write_bytes(b"")
    nan = dict(good)
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, str(folder / "bad_nan.safetensors"))
    ranks = dict(good)
    down = next(k for k in ranks if k.endswith("lora_down.weight"))
    ranks[down] = ranks[down][:3].clone()
    save_file(ranks, str(folder / "bad_ranks.safetensors"))
    save_file({"foo.bar": torch.zeros(2, 2)}, str(folder / "bad_unknown.safetensors"))
    torch.save({"x": argparse.Namespace(a=1)}, str(folder / "bad_pickle.pt"))  # weights-only loading must refuse it


#: file → words the node error must contain (besides the file name).
BAD_LORAS = {
    "bad_truncated.safetensors": "truncated",
    "bad_header.safetensors": "corrupt safetensors header",
    "bad_text.safetensors": "not a safetensors file",
    "bad_empty.safetensors": "empty",
    "bad_nan.safetensors": "NaN",
    "bad_ranks.safetensors": "ranks disagree",
    "bad_unknown.safetensors": "no LoRA module found",
    "bad_pickle.pt": "weights-only",
    "for_sdxl.safetensors": "another base model",
}


def _sampling(model_ref: list, prefix: str) -> dict[str, Any]:
    return {
        "c1": {"class_type": "ProLoRATinyConditioning", "inputs": {"model": model_ref, "text": "a red disc"}},
        "c2": {"class_type": "ProLoRATinyConditioning", "inputs": {"model": model_ref, "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "positive": ["c1", 0], "negative": ["c2", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": prefix}},
    }


def _transfer_workflow(lora_name: str) -> dict[str, Any]:
    return {
        "src": {"class_type": "ProLoRATinyModelLoader", "inputs": {"model_name": "tiny_src.safetensors"}},
        "tgt": {"class_type": "ProLoRATinyModelLoader", "inputs": {"model_name": "tiny_tgt.safetensors"}},
        "lora": {"class_type": "ProLoRALoadLoRA", "inputs": {"lora_name": lora_name}},
        "bs": {"class_type": "ProLoRAComputeBasis", "inputs": {"model": ["src", 0], "subspace_rank": 0, "device": "cpu", "use_cache": True}},
        "bt": {"class_type": "ProLoRAComputeBasis", "inputs": {"model": ["tgt", 0], "subspace_rank": 0, "device": "cpu", "use_cache": True}},
        "match": {"class_type": "ProLoRAMatchModules", "inputs": {"source_basis": ["bs", 0], "target_basis": ["bt", 0], "lora": ["lora", 0],
                                                                   "threshold": 0.5, "pairing": "name"}},
        "proj": {"class_type": "ProLoRAProjectLoRA", "inputs": {"lora": ["lora", 0], "match": ["match", 0], "mode": "prolora-full", "out_rank": 0,
                                                                 "rescale_to_source_norm": False}},
        "apply": {"class_type": "LoraModelLoader", "inputs": {"model": ["tgt", 0], "lora": ["proj", 0], "strength_model": 1.0}},
        **_sampling(["apply", 0], "prolora_server_test"),
    }


def test_pack_loads_and_registers_its_nodes(server: comfy_host.ComfyServer) -> None:
    assert server.pack_import_errors() == []
    info = server.object_info()
    for node_id in OUR_NODES:
        assert node_id in info, node_id
        assert info[node_id]["category"] == "ProLoRA"
    spec = info["ProLoRATinyModelLoader"]["input"]["required"]["model_name"]
    assert "tiny_src.safetensors" in spec[1]["options"], spec


def test_transfer_then_sample_workflow_succeeds(server: comfy_host.ComfyServer) -> None:
    entry = server.run(_transfer_workflow("style.safetensors"), timeout=120)
    ui = entry["outputs"]["match"]["prolora_match"][0]
    assert ui["modules"] == len(MODULES) and ui["passing"] == len(MODULES)
    assert list((server.base_dir / "output").glob("prolora_server_test*.latent"))


def test_files_node_output_loads_in_core_lora_loader_by_name(server: comfy_host.ComfyServer) -> None:
    wf = {
        "files": {"class_type": "ProLoRATransferLoRAFiles", "inputs": {
            "source_model": "diffusion_models/tiny_src.safetensors", "target_model": "diffusion_models/tiny_tgt.safetensors",
            "lora_name": "style.safetensors", "more_loras": "concept.safetensors", "mode": "prolora-full", "subspace_rank": 0,
            "threshold": 0.5, "pairing": "name", "filename_pattern": "{lora}_to_tgt", "device": "cpu", "cache_max_gb": 1.0}},
    }
    entry = server.run(wf, timeout=120)
    text = "\n".join(entry["outputs"]["files"]["text"])
    assert "style.safetensors: 3 modules\n  3 transferred" in text and "concept.safetensors: 2 modules\n  2 transferred" in text, text
    assert "(limit 1 GB)" in text, text
    assert (server.base_dir / "models" / "loras" / "style_to_tgt.safetensors").is_file()
    second = {
        "tgt": {"class_type": "ProLoRATinyModelLoader", "inputs": {"model_name": "tiny_tgt.safetensors"}},
        "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["tgt", 0], "lora_name": "style_to_tgt.safetensors", "strength_model": 1.0}},
        **_sampling(["lora", 0], "prolora_files_test"),
    }
    server.run(second, timeout=120)
    assert "lora key not loaded" not in server.log_text()


def test_lora_for_another_base_is_a_node_error_and_the_server_keeps_serving(server: comfy_host.ComfyServer) -> None:
    prompt_id = server.post_prompt(_transfer_workflow("for_sdxl.safetensors"))
    entry = server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert err["node_type"] == "ProLoRAMatchModules"
    assert "for_sdxl.safetensors" in err["exception_message"] and "another base model" in err["exception_message"]
    server.run(_transfer_workflow("concept.safetensors"), timeout=120)  # still serving


@pytest.mark.parametrize("name", list(BAD_LORAS))
def test_bad_lora_is_a_clear_node_error_and_the_server_keeps_serving(server: comfy_host.ComfyServer, name: str) -> None:
    prompt_id = server.post_prompt(_transfer_workflow(name))
    entry = server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    message = err["exception_message"]
    assert name in message and BAD_LORAS[name] in message, message
    assert err["node_type"].startswith("ProLoRA")
    assert server.process.poll() is None
    server.run(_transfer_workflow("concept.safetensors"), timeout=120)  # still serving
