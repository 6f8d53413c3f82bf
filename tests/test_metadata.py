"""Metadata of a transferred LoRA stays true: trigger words and tags kept, the tensor hashes
(``sshs_model_hash``/``sshs_legacy_hash``) recomputed for the file actually written — checked
against kohya's sd-scripts algorithm written out here from its source, and against the file's own
bytes — and the base-model fields naming the target (or dropped where its family is unknown).
Through the CLI (file to file) and through the nodes (Load → Project → Save LoRA, real host)."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch

import comfy_host
from fixtures_files import make_bases, make_updates, read_metadata, run_main, write_lora

K = 4


def kohya_reference(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts ``train_util.precalculate_safetensors_hashes`` step by step: only ``ss_*``
    metadata, ``safetensors.torch.save``, then ``addnet_hash_safetensors`` and ``addnet_hash_legacy``."""
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    model = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[0:8]


def file_hashes(path: Path) -> tuple[str, str]:
    """What a file's own hashes must be: kohya's reference of its tensors and ``ss_*`` metadata."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return kohya_reference(tensors, meta)


def data_section_sha256(path: Path) -> str:
    """sd-webui-additional-networks' file hash: SHA-256 of everything after the header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def test_kohya_hashes_follow_sd_scripts_on_a_file_larger_than_one_mebibyte(pack: Any) -> None:
    provenance = sys.modules[pack.__name__ + ".prolora_core.provenance"]
    gen = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn((8, 40000), generator=gen),  # 1.28 MB: the legacy hash reads real data
               "lora_unet_a.lora_up.weight": torch.randn((64, 8), generator=gen).half(), "lora_unet_a.alpha": torch.tensor(4.0)}
    meta = {"ss_output_name": "x", "ss_tag_frequency": json.dumps({"a": {"b": 1}}), "modelspec.title": "not hashed"}
    got = provenance.kohya_hashes(tensors, meta)
    model, legacy = kohya_reference(tensors, meta)
    assert got == {"sshs_model_hash": model, "sshs_legacy_hash": legacy}
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]  # the 64 KiB at 1 MiB were there to hash
    assert provenance.kohya_hashes(tensors, {**meta, "modelspec.title": "other"}) == got  # only ss_* metadata counts
    assert provenance.kohya_hashes(tensors, {**meta, "ss_output_name": "x" * 17})["sshs_legacy_hash"] != legacy  # ss_* shift the data
    assert provenance.refresh_tensor_hashes(tensors, meta) == meta  # no hashes in, none added


def test_cli_output_gets_its_own_hashes_and_drops_the_source_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates()
    probe = tmp_path / "probe.safetensors"
    write_lora(probe, updates)
    with safetensors.safe_open(str(probe), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tags = json.dumps({"10_cat": {"cat": 12}})
    meta = {"ss_tag_frequency": tags, "ss_output_name": "cat", "modelspec.trigger_phrase": "a cat", "ss_base_model_version": "sd_v1",
            "modelspec.architecture": "stable-diffusion-v1/lora"}
    src_model, src_legacy = kohya_reference(tensors, meta)
    meta |= {"sshs_model_hash": src_model, "sshs_legacy_hash": src_legacy}
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates, metadata=meta)
    out = tmp_path / "out.safetensors"
    argv = ["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora.resolve(), "--out", out.resolve(),
            "--no-cache", "--device", "cpu", "--subspace-rank", str(K), "--mode", "prolora"]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    got = read_metadata(out)
    assert got["ss_tag_frequency"] == tags and got["ss_output_name"] == "cat" and got["modelspec.trigger_phrase"] == "a cat"
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == file_hashes(out)
    assert got["sshs_model_hash"] == data_section_sha256(out) != src_model  # a new file, a new identity
    assert got["prolora.source_sshs_model_hash"] == src_model and got["prolora.source_sshs_legacy_hash"] == src_legacy
    # the CLI does not know the target's family: the fields naming the source base are dropped, the originals kept aside
    assert "ss_base_model_version" not in got and "modelspec.architecture" not in got
    assert got["prolora.original_ss_base_model_version"] == "sd_v1"
    assert got["prolora.original_modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_nodes_name_the_target_family_and_saved_files_carry_their_own_hashes(nodes_by_id: dict[str, Any], pack: Any, comfyui: Any,
                                                                             tmp_path: Path) -> None:
    import folder_paths

    bridge = sys.modules[pack.__name__ + ".nodes.bridge"]
    src = comfy_host.tiny_sd15_model(0)
    tgt = comfy_host.perturbed_copy(src, 0.05, 31)
    modules = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.2"]
    tensors = comfy_host.kohya_lora(src, modules, alpha=2.0)
    meta = {"ss_tag_frequency": json.dumps({"style": {"stripes": 3}}), "modelspec.trigger_phrase": "stripes",
            # metadata that names another base (as a LoRA moved once before would): the output names the real target
            "ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora/lycoris"}
    src_hashes = kohya_reference(tensors, meta)
    lora = bridge.LoraModel(tensors, {**meta, "sshs_model_hash": src_hashes[0], "sshs_legacy_hash": src_hashes[1]})
    run = lambda node, **kw: tuple(nodes_by_id[node].execute(**kw).args)  # noqa: E731
    (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False, name="my-sd15")
    (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False, name="my-finetune")
    assert (bs.family, bt.family) == ("SD15", "SD15")  # the family is the model's, whatever the label
    match, _ = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    out, _ = run("ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    got = out.metadata
    assert got["ss_base_model_version"] == "sd_v1" and got["modelspec.architecture"] == "stable-diffusion-v1/lora/lycoris"
    assert got["prolora.original_ss_base_model_version"] == "sdxl_base_v1-0" and got["prolora.target_family"] == "SD15"
    assert got["modelspec.trigger_phrase"] == "stripes" and got["ss_tag_frequency"] == meta["ss_tag_frequency"]
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == kohya_reference(dict(out), got) and got["sshs_model_hash"] != src_hashes[0]
    (tmp_path / "loras").mkdir()
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"), is_default=True)
    for key_format in ("as input", "comfyui-native"):
        (name,) = run("ProLoRASaveLoRA", lora=out, filename=f"prolora/hashes_{key_format[:2]}", key_format=key_format, overwrite=True)
        path = Path(folder_paths.get_full_path("loras", name))
        saved = read_metadata(path)
        assert (saved["sshs_model_hash"], saved["sshs_legacy_hash"]) == file_hashes(path), key_format
        assert saved["sshs_model_hash"] == data_section_sha256(path), key_format
    with safetensors.safe_open(str(tmp_path / "loras" / "prolora" / "hashes_as.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)  # kohya names in, kohya names out: the hash is of these keys
