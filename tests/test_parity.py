"""ComfyUI parity: a LoRA file means what ComfyUI 0.3.75's own loader does with it.

For every file of the corpus (tests/parity_corpus.py: kohya, PEFT, diffusers, ComfyUI-native and
LyCORIS layouts on the tiny SD1.5 model and its text encoder), through the nodes (MODEL + CLIP,
target = source):

* ``copy``: the output, applied by ComfyUI's ``load_lora_for_models``, changes every UNet and
  text-encoder weight as the original file applied the same way does;
* ``prolora-full``: the same, within the file's dtype (and √0.001 for re-factored LoHa/LoKr);
* what is not used is named in Match Modules' summary and Project LoRA's report, and is exactly
  what ComfyUI itself leaves unapplied (its "lora key not loaded" keys are among them).

The CLI reads the same files against a base file with diffusers names.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_host
from fixtures_files import read_report, rel_err, run_main
from parity_corpus import Case, build_corpus
from prolora_core.lora import split_module_key

Tensor = torch.Tensor


@pytest.fixture(scope="module")
def host(comfyui: Any) -> tuple[Any, Any, list[Case]]:
    model, clip = comfy_host.tiny_sd15_model(0), comfy_host.tiny_clip(0)
    return model, clip, build_corpus(model, clip)


CASE_NAMES = ["kohya-ldm", "kohya-diffusers", "peft", "peft-default", "peft-prefixed", "diffusers-lora-up", "diffusers-processor",
              "native-mixed-dtypes", "kohya-bf16", "flattened-factor-layouts", "rank-above-min", "lycoris-locon-tucker", "loha",
              "lycoris-tucker-loha-lokr", "lokr", "dora", "diff-and-norms", "unknown-keys"]


def test_every_corpus_case_is_run(host: tuple[Any, Any, list[Case]]) -> None:
    assert sorted(c.name for c in host[2]) == sorted(CASE_NAMES)


def _case(host: tuple[Any, Any, list[Case]], name: str) -> Case:
    return next(c for c in host[2] if c.name == name)


def _run(nodes_by_id: dict[str, Any], node_id: str, **kwargs: Any) -> tuple:
    return tuple(nodes_by_id[node_id].execute(**kwargs).args)


def comfy_weights(model: Any, clip: Any, lora: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """All UNet and text-encoder weights after ComfyUI's ``load_lora_for_models`` (strength 1), and the
    keys ComfyUI logged as not loaded."""
    import comfy.lora
    import comfy.sd

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        m, c = comfy.sd.load_lora_for_models(model, clip, dict(lora), 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    out = {k: v for k, v in comfy_host.unet_weights(m, patched=True).items()}
    for key, entry in c.patcher.get_key_patches().items():
        w = entry[0][0].detach().to(torch.float32, copy=True)
        out[key] = comfy.lora.calculate_weight(entry[1:], w, key) if len(entry) > 1 else w
    return out, [r.removeprefix("lora key not loaded: ") for r in records if r.startswith("lora key not loaded")]


def _project(nodes_by_id: dict[str, Any], model: Any, clip: Any, lora: dict[str, Tensor], mode: str) -> tuple[dict, str, str]:
    (b,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=model, clip=clip, subspace_rank=4, device="cpu", use_cache=False)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=b, target_basis=b, lora=lora, threshold=0.8, pairing="name")
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode=mode, out_rank=0, rescale_to_source_norm=False)
    return out, summary, report


def _changed(after: dict[str, Tensor], base: dict[str, Tensor]) -> set[str]:
    return {k for k in base if not torch.equal(after[k], base[k])}


def _refactored_keys(case: Case, host: tuple[Any, Any, list[Case]]) -> set[str]:
    """Weight keys of the modules written as re-factored LoRAs in prolora-full."""
    import comfy.lora

    model, clip, _ = host
    km = comfy.lora.model_lora_keys_unet(model.model, {})
    km = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, km)
    return {km[m] for m in case.refactored}


@pytest.fixture(scope="module")
def loras_dir(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models/loras`` folder of ComfyUI's for Save LoRA."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return folder


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_file_applies_as_comfyui_applies_it(nodes_by_id: dict[str, Any], host: tuple[Any, Any, list[Case]], loras_dir: Path,
                                                   name: str) -> None:
    model, clip, _ = host
    case = _case(host, name)
    base, _ = comfy_weights(model, clip, {})
    want, not_loaded = comfy_weights(model, clip, case.tensors)
    touched = _changed(want, base)
    assert touched, "ComfyUI applies something of every corpus file"

    # What the pack does not use is what ComfyUI leaves unapplied, named with the reason.
    unapplied = set(case.unused) | {k for k in case.tensors for m in case.unmapped if k.startswith(m + ".")}
    assert set(not_loaded) <= unapplied, "every key ComfyUI does not load is one the pack reports"
    out, summary, report = _project(nodes_by_id, model, clip, case.tensors, "copy")
    for text in (summary, report):
        for key in case.unused:
            assert key in text, (key, text)
        for module in case.unmapped:
            assert f"{module}.*: no entry in ComfyUI's LoRA key map" in text, text
        if unapplied:
            assert f"not used ({len(case.unused)} tensors, {len(case.unmapped)} modules):" in text, text
        else:
            assert "not used" not in text, text

    # (i) copy: ComfyUI applies the output exactly as it applies the original.
    got, not_loaded_out = comfy_weights(model, clip, out)
    assert not not_loaded_out, not_loaded_out
    assert _changed(got, base) == touched
    for key in touched:
        delta_want, delta_got = (want[key] - base[key]).double().numpy(), (got[key] - base[key]).double().numpy()
        assert rel_err(delta_got, delta_want) <= 1e-5, key

    # Saved in the input's own key spelling, the file is applied the same way.
    (saved,) = _run(nodes_by_id, "ProLoRASaveLoRA", lora=out, filename=f"parity/{name}", key_format="as input", overwrite=True)
    file_tensors = load_file(str(loras_dir / saved))
    for module in {split_module_key(k)[0] for k in file_tensors}:
        assert any(k.startswith((module + ".", module + "_lora.")) for k in case.tensors), f"{module} is not spelled as in the input"
    from_file, not_loaded_file = comfy_weights(model, clip, file_tensors)
    assert not not_loaded_file, not_loaded_file
    assert all(torch.equal(from_file[k], got[k]) for k in got), "the saved file applies as the LORA_MODEL does"

    # (ii) prolora-full with target = source gives the same weights back.
    out, _, report = _project(nodes_by_id, model, clip, case.tensors, "prolora-full")
    got, not_loaded_out = comfy_weights(model, clip, out)
    assert not not_loaded_out, not_loaded_out
    assert _changed(got, base) == touched
    refactored = _refactored_keys(case, host)
    for key in touched:
        tol = 0.032 if key in refactored else case.tol
        delta_want, delta_got = (want[key] - base[key]).double().numpy(), (got[key] - base[key]).double().numpy()
        assert rel_err(delta_got, delta_want) <= tol, (key, rel_err(delta_got, delta_want))


def test_rank_above_min_matches_the_dense_reference_and_is_written_at_most_min_m_n(
        nodes_by_id: dict[str, Any], host: tuple[Any, Any, list[Case]]) -> None:
    """Rank 40 on a 32×32 weight, LoCon rank 8 on conv_out [4, 32, 3, 3], onto a perturbed target:
    the output equals the float64 reference projection; re-compressed to min(m, n) = 32
    (``out_rank``), the 32×32 update loses nothing."""
    from reference import reference_transfer

    model, clip, _ = host
    case = _case(host, "rank-above-min")
    target = comfy_host.perturbed_copy(model, 0.05, seed=3)
    k = 4
    (bs,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=model, clip=None, subspace_rank=k, device="cpu", use_cache=False)
    (bt,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=target, clip=None, subspace_rank=k, device="cpu", use_cache=False)
    match, _ = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=case.tensors, threshold=0.0, pairing="name")
    ws, wt = comfy_host.unet_weights(model), comfy_host.unet_weights(target)
    for out_rank in (0, 32):
        out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=case.tensors, match=match, mode="prolora-full", out_rank=out_rank,
                           rescale_to_source_norm=False)
        assert "2/2 modules transferred" in report, report
        for module, r in (("input_blocks.1.1.transformer_blocks.0.attn1.to_q", 40), ("out.2", 8)):
            name = "lora_unet_" + module.replace(".", "_")
            w_s, w_t = ws[f"diffusion_model.{module}.weight"], wt[f"diffusion_model.{module}.weight"]
            up = case.tensors[f"{name}.lora_up.weight"].double().reshape(w_s.shape[0], r)
            down = case.tensors[f"{name}.lora_down.weight"].double().reshape(r, -1)
            delta = float(case.tensors[f"{name}.alpha"]) / r * (up @ down).numpy()
            ws_m, wt_m = w_s.double().reshape(w_s.shape[0], -1).numpy(), w_t.double().reshape(w_t.shape[0], -1).numpy()
            ref = reference_transfer(delta, ws_m, wt_m, min(k, min(ws_m.shape) - 1), "prolora-full")  # k ≤ min(m, n) − 1
            o_up, o_down = out[f"diffusion_model.{module}.lora_up.weight"], out[f"diffusion_model.{module}.lora_down.weight"]
            rank_out = o_down.shape[0]
            product = o_up.double().reshape(w_s.shape[0], -1) @ o_down.double().reshape(rank_out, -1)
            got = float(out[f"diffusion_model.{module}.alpha"]) / rank_out * product.numpy()
            assert rel_err(got, ref) <= 1e-5, (module, out_rank, rel_err(got, ref))
            assert rank_out == (min(ref.shape) if out_rank and r > out_rank else r), (module, out_rank, rank_out)


# --------------------------------------------------------------------------------------
# The CLI on the same files, against a base file with diffusers names
# --------------------------------------------------------------------------------------

def _diffusers_base(model: Any, clip: Any, path: Path) -> dict[str, Tensor]:
    """The tiny model's UNet under diffusers names (``unet_to_diffusers``) and its text encoder under
    ``text_encoder.text_model.…``, as a safetensors base file; returns the tensors."""
    import comfy.utils

    sd = model.model.state_dict()
    tensors = {d: sd[f"diffusion_model.{ldm}"].float().contiguous()
               for d, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items() if f"diffusion_model.{ldm}" in sd}
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.startswith("clip_l.transformer.text_model."):
            tensors["text_encoder." + k.removeprefix("clip_l.transformer.")] = v.float().contiguous()
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("name", ["diffusers-processor", "peft-default", "rank-above-min", "unknown-keys"])
def test_cli_reads_the_corpus_file_and_lists_what_it_does_not_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  host: tuple[Any, Any, list[Case]], name: str) -> None:
    import comfy.lora

    model, clip, _ = host
    case = _case(host, name)
    base_path = tmp_path / "base.safetensors"
    if name in ("rank-above-min", "unknown-keys"):  # kohya LDM names: a checkpoint-layout base
        comfy_host.save_model_state(model, base_path)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        base = comfy_host.unet_weights(model)
    else:
        base = _diffusers_base(model, clip, base_path)
        key_map = {k.removesuffix(".weight"): k for k in base if k.endswith(".weight")}
        key_map.update({k.removesuffix(".weight").replace(".to_", ".processor.to_").removesuffix(".0"): k
                        for k in base if ".to_" in k and k.endswith(".weight")})
        key_map.update({"unet." + k: v for k, v in key_map.items()})
    lora_path, out_path, report_path = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "report.json"
    save_file(case.tensors, str(lora_path))
    rc, _, err = run_main(["transfer", "--source-base", base_path, "--target-base", base_path, "--lora", lora_path, "--out", out_path,
                           "--report", report_path, "--no-cache", "--device", "cpu", "--mode", "prolora-full", "--subspace-rank", "4"], capsys)
    assert rc == 0, err
    report = read_report(report_path)
    assert set(report["summary"]["unused"][str(lora_path)]) == set(case.unused)
    for key in case.unused:
        assert key in err, err
    out = load_file(str(out_path))
    want = {k: comfy.lora.calculate_weight([(1.0, p, 1.0, None, None)], base[k].float().clone(), k)
            for k, p in comfy.lora.load_lora(case.tensors, key_map, log_missing=False).items()}
    got = {k: comfy.lora.calculate_weight([(1.0, p, 1.0, None, None)], base[k].float().clone(), k)
           for k, p in comfy.lora.load_lora(out, key_map, log_missing=False).items()}
    assert set(got) == set(want) and want
    for k in want:
        assert rel_err((got[k] - base[k]).double().numpy(), (want[k] - base[k]).double().numpy()) <= 1e-4, k
