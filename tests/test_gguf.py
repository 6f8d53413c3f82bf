"""GGUF bases (ComfyUI-GGUF's files): real .gguf files written with ``gguf.GGUFWriter`` in F16, Q8_0
and Q4_K, read through ``prolora_core.gguf_weights.GGUFWeights``.

* values: Q8_0 and Q4_K blocks decoded here by hand from their byte layout (independent of the
  ``gguf`` package's dequantizer), F16 against the written values; names with ComfyUI-GGUF's
  ``model.diffusion_model.`` prefix stripped, shapes reversed from GGUF's order or taken from
  ``comfy.gguf.orig_shape``; content keys from the quantized bytes;
* the CLI: a transfer with a GGUF target (and source) gives the same LoRA as the same transfer with
  safetensors bases holding the dequantized weights, and says that the bases came from a quantized file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from fixtures_files import decaying_weight, expected_dense, lora_name, make_updates, read_output, rel_err, run_main, write_base, write_lora
from prolora_core.errors import ProLoRAError
from prolora_core.gguf_weights import GGUFWeights
from prolora_core.weights import SafetensorsWeights, open_weights

Q = gguf.GGMLQuantizationType
PREFIX = "model.diffusion_model."
#: module → shape; rows of 256 columns so every block type fits (Q8_0 blocks hold 32 values, K-quants 256)
MODULES: dict[str, tuple[int, ...]] = {"blocks.0.self_attn.q": (48, 256), "blocks.0.ffn.0": (96, 256), "blocks.0.ffn.2": (256, 96)}
K = 4
EXACT = ["--basis-method", "exact", "--compute-dtype", "float64", "--subspace-rank", str(K), "--no-cache", "--device", "cpu"]


def write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: Q, *, prefix: str = PREFIX,
               raw: dict[str, tuple[np.ndarray, Q]] | None = None, orig_shape: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A GGUF file as ComfyUI-GGUF's converter writes one: architecture ``wan``, ``<prefix><module>.weight``
    quantized to ``qtype`` where its rows fit the blocks (F16 otherwise), a 1-D bias in F32; ``raw``:
    tensors given as already-quantized bytes; ``orig_shape``: stored flattened to 2-D, with the
    shape in ``comfy.gguf.orig_shape.<name>``."""
    w = gguf.GGUFWriter(str(path), "wan")
    for name, value in weights.items():
        key = f"{prefix}{name}.weight"
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if qtype == Q.F16 or value.ndim != 2 or value.shape[1] % block:
            w.add_tensor(key, value.astype(np.float16))
        else:
            w.add_tensor(key, quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
        w.add_tensor(f"{prefix}{name}.bias", np.zeros(value.shape[0], np.float32))
    for name, (data, qt) in (raw or {}).items():
        w.add_tensor(f"{prefix}{name}.weight", data, raw_dtype=qt)
    for name, shape in (orig_shape or {}).items():
        w.add_array(f"comfy.gguf.orig_shape.{prefix}{name}.weight", list(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def decode_q8_0(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 by hand: blocks of 34 bytes, an fp16 scale d then 32 int8 q; value = d·q."""
    blocks = np.ascontiguousarray(data).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def q4_k_blocks(rng: np.random.Generator, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles) with every sub-block scale 1 and min 0, so value = d·nibble; and those values, in the
    order the format lays them out (per 64 values: 32 low nibbles, then the 32 high nibbles)."""
    d = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
    qs = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
    scales = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8)  # sc=1, m=0 for all 8 sub-blocks
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), np.zeros((n_blocks, 2), np.uint8), np.tile(scales, (n_blocks, 1)), qs], axis=1)
    chunks = qs.reshape(n_blocks, 4, 32)
    nibbles = np.concatenate([chunks & 0xF, chunks >> 4], axis=2).reshape(n_blocks, 256)
    return blocks, d.astype(np.float32).reshape(-1, 1) * nibbles


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: decaying_weight(rng, shape) for name, shape in MODULES.items()}


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["F16", "Q8_0"])
def test_values_names_and_shapes(tmp_path: Path, weights: dict[str, np.ndarray], qtype: Q) -> None:
    path = write_gguf(tmp_path / "base.gguf", weights, qtype)
    base = open_weights(path)
    assert isinstance(base, GGUFWeights) and base.label == "base.gguf"
    assert sorted(base.keys()) == sorted(f"{m}.{s}" for m in MODULES for s in ("weight", "bias"))
    assert base.quantized == ([] if qtype == Q.F16 else ["Q8_0"])
    reader = gguf.GGUFReader(str(path))
    raw = {t.name.removeprefix(PREFIX): t for t in reader.tensors}
    for name, w in weights.items():
        key = f"{name}.weight"
        assert base.shape(key) == w.shape  # GGUF stores [in, out]: reversed back
        got = base.get(key)
        assert got.dtype == torch.float32 and tuple(got.shape) == w.shape
        want = w.astype(np.float16).astype(np.float32) if qtype == Q.F16 else decode_q8_0(raw[key].data, w.shape)
        np.testing.assert_array_equal(got.numpy(), want)
        assert rel_err(got.numpy(), w) < (1e-3 if qtype == Q.F16 else 1e-2)  # and close to the full-precision weight
    assert base.get("blocks.0.ffn.0.bias").shape == (96,)


def test_k_quant_orig_shape_and_unprefixed_names(tmp_path: Path) -> None:
    """A Q4_K weight decoded by hand, a tensor stored flattened with ``comfy.gguf.orig_shape`` (as the
    converter writes 5-D or reshaped tensors), and a file whose names carry no prefix."""
    rng = np.random.default_rng(1)
    blocks, values = q4_k_blocks(rng, 8)  # 8 blocks of 256: an [8, 256] weight
    conv = rng.standard_normal((16, 4, 1, 2, 2)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "wan")
    w.add_tensor("blocks.0.cross_attn.k.weight", blocks, raw_dtype=Q.Q4_K)
    w.add_tensor("patch_embedding.weight", conv.reshape(16, 16).astype(np.float16))
    w.add_array("comfy.gguf.orig_shape.patch_embedding.weight", [16, 4, 1, 2, 2])
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    base = GGUFWeights(tmp_path / "k.gguf")
    assert sorted(base.keys()) == ["blocks.0.cross_attn.k.weight", "patch_embedding.weight"]
    assert base.quantized == ["Q4_K"] and base.metadata["general.architecture"] == "wan"
    assert base.shape("blocks.0.cross_attn.k.weight") == (8, 256)
    np.testing.assert_allclose(base.get("blocks.0.cross_attn.k.weight").numpy(), values, rtol=1e-6)
    assert base.shape("patch_embedding.weight") == (16, 4, 1, 2, 2)
    np.testing.assert_array_equal(base.get("patch_embedding.weight").numpy(), conv.astype(np.float16).astype(np.float32))


def test_content_keys_follow_the_quantized_bytes(tmp_path: Path, weights: dict[str, np.ndarray]) -> None:
    a = GGUFWeights(write_gguf(tmp_path / "a.gguf", weights, Q.Q8_0))
    b = GGUFWeights(write_gguf(tmp_path / "b.gguf", weights, Q.Q8_0, prefix=""))  # same weights, other names and file
    f16 = GGUFWeights(write_gguf(tmp_path / "c.gguf", weights, Q.F16))
    changed = dict(weights)
    changed["blocks.0.ffn.0"] = weights["blocks.0.ffn.0"] * 1.5
    c = GGUFWeights(write_gguf(tmp_path / "d.gguf", changed, Q.Q8_0))
    for name in MODULES:
        key = f"{name}.weight"
        assert a.content_key(key) == b.content_key(key) != f16.content_key(key)
        assert (c.content_key(key) == a.content_key(key)) == (name != "blocks.0.ffn.0")
    st = SafetensorsWeights(write_base(tmp_path / "s.safetensors", {n: a.get(f"{n}.weight").numpy() for n in MODULES}))
    assert st.content_key("blocks.0.ffn.0.weight") != a.content_key("blocks.0.ffn.0.weight")  # float32 bytes, not Q8_0 ones


def test_bad_gguf_files_are_refused_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + bytes(8))
    with pytest.raises(ProLoRAError, match=r"cut\.gguf.*not a readable GGUF file"):
        open_weights(bad)
    with pytest.raises(ProLoRAError, match="file not found"):
        open_weights(tmp_path / "missing.gguf")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16], ids=["Q8_0", "F16"])
@pytest.mark.parametrize("mode", ["prolora", "subspace", "copy"])
def test_cli_transfer_with_gguf_bases_equals_the_dequantized_safetensors_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                weights: dict[str, np.ndarray], qtype: Q, mode: str) -> None:
    rng = np.random.default_rng(2)
    target_w = {n: (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32) for n, w in weights.items()}
    src_gguf = write_gguf(tmp_path / "wan21.gguf", weights, qtype)
    tgt_gguf = write_gguf(tmp_path / "wan22_high.gguf", target_w, qtype)
    src_deq = {n: GGUFWeights(src_gguf).get(f"{n}.weight").numpy() for n in MODULES}
    tgt_deq = {n: GGUFWeights(tgt_gguf).get(f"{n}.weight").numpy() for n in MODULES}
    src_st = write_base(tmp_path / "wan21.safetensors", src_deq, PREFIX)
    tgt_st = write_base(tmp_path / "wan22_high.safetensors", tgt_deq, PREFIX)
    updates = make_updates(modules=MODULES)
    lora = write_lora(tmp_path / "style.safetensors", updates, "underscore")
    outs = {}
    for label, (source, target) in {"gguf": (src_st, tgt_gguf), "both": (src_gguf, tgt_gguf), "st": (src_st, tgt_st)}.items():
        out, report = tmp_path / f"{label}.safetensors", tmp_path / f"{label}.json"
        rc, _, err = run_main(["transfer", "--source-base", source, "--target-base", target, "--lora", lora, "--out", out,
                               "--mode", mode, "--report", report, *EXACT], capsys)
        assert rc == 0, err
        summary = json.loads(report.read_text())["summary"]
        quantized = [p.name for p in (source, target) if p.suffix == ".gguf" and qtype != Q.F16]
        assert sorted(summary["quantized_bases"]) == sorted(quantized)
        for name in quantized:
            assert f"[prolora] {name} is quantized (Q8_0): its bases are those of the dequantized weights" in err
        outs[label] = read_output(out)
    for name, u in updates.items():
        lora_key = lora_name(name, "underscore")
        want = expected_dense(u, src_deq[name], tgt_deq[name], K, mode)
        for label, result in outs.items():
            assert rel_err(result[lora_key].dense(), want) <= 1e-6, (label, name)


def test_how_much_quantized_bases_move(tmp_path: Path) -> None:
    """The measurement behind the README's GGUF row: Φ between the top-k bases of the same weight
    stored as F16 and as Q8_0 / Q5_0 / Q4_0 (the gguf package quantizes no K-quant), and how much a
    ``prolora`` projection onto a target (source + 1 % noise) moves when both bases come from the
    quantized files. A power-law spectrum (σ_i ∝ i^−0.5, like trained weights), 128 × 256, k = 32.
    Printed with ``-s``; asserted: coarser quantization moves the result more."""
    from reference import phi, power_law_weight, reference_transfer, top_bases

    rng = np.random.default_rng(3)
    ws = power_law_weight(rng, 128, 256).astype(np.float32)
    wt = (ws + 0.01 * np.abs(ws).mean() * rng.standard_normal(ws.shape)).astype(np.float32)
    delta = 0.1 * rng.standard_normal((128, 4)) @ rng.standard_normal((4, 256))
    k = 32
    deq = {}
    for qt in (Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_0):
        pair = [GGUFWeights(write_gguf(tmp_path / f"{side}_{qt.name}.gguf", {"m": w}, qt)).get("m.weight").numpy().astype(np.float64)
                for side, w in (("s", ws), ("t", wt))]
        deq[qt] = pair
    ref = reference_transfer(delta, *deq[Q.F16], k, "prolora")
    us, vs = top_bases(deq[Q.F16][0], k)
    moved = []
    for qt in (Q.Q8_0, Q.Q5_0, Q.Q4_0):
        uq, vq = top_bases(deq[qt][0], k)
        got = reference_transfer(delta, *deq[qt], k, "prolora")
        moved.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
        print(f"{qt.name}: weight error {rel_err(deq[qt][0], deq[Q.F16][0]):.2e}, Φ_U(F16, {qt.name}) {phi(us, uq):.5f}, "
              f"Φ_V {phi(vs, vq):.5f}, prolora result moves {moved[-1]:.2e} (relative)")
    assert moved[0] < moved[1] < moved[2]


def test_cli_similarity_with_a_gguf_target_equals_the_dequantized_safetensors_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                   weights: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(5)
    src = write_base(tmp_path / "src.safetensors", weights, PREFIX)
    tgt_gguf = write_gguf(tmp_path / "tgt.gguf", {n: (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32) for n, w in weights.items()},
                          Q.Q8_0, prefix="")
    tgt_st = write_base(tmp_path / "tgt.safetensors", {n: GGUFWeights(tgt_gguf).get(f"{n}.weight").numpy() for n in MODULES})
    rows, notes = {}, {}
    for target in (tgt_gguf, tgt_st):
        rc, out, err = run_main(["similarity", "--source-base", src, "--target-base", target, "--json", "--no-cache", "--device", "cpu",
                                 "--basis-method", "exact", "--compute-dtype", "float64"], capsys)
        assert rc == 0, err
        rows[target.suffix] = {r["module"]: r for r in json.loads(out)}
        notes[target.suffix] = "is quantized (Q8_0): its bases are those of the dequantized weights" in err
    assert notes == {".gguf": True, ".safetensors": False}
    assert set(rows[".gguf"]) == set(MODULES)
    for name in MODULES:
        g, s = rows[".gguf"][name], rows[".safetensors"][name]
        assert g["similarity_u"] == pytest.approx(s["similarity_u"], abs=1e-9) and g["similarity_v"] == pytest.approx(s["similarity_v"], abs=1e-9)
        assert g["similarity_u"] is not None and g["k"] == s["k"]


# --------------------------------------------------------------------------------------
# The files node on a GGUF pair (ComfyUI's detection and key map on the GGUF's names and shapes)
# --------------------------------------------------------------------------------------

#: A tiny Wan 2.1 whose widths fit Q8_0 blocks (every 2-D weight has a multiple of 32 columns), and
#: whose ``dim`` gives ComfyUI's detection (``num_heads = dim // 128``) one head.
WAN_GGUF_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 1, "in_dim": 4,
                   "out_dim": 4, "text_dim": 64, "freq_dim": 32, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
                   "cross_attn_norm": True, "eps": 1e-6}


def write_state_gguf(path: Path, sd: dict[str, torch.Tensor], qtype: Q) -> Path:
    """A diffusion model's state dict (``diffusion_model.…`` keys) as ComfyUI-GGUF's converter writes
    it: ``model.diffusion_model.…`` names, 2-D weights quantized when their rows fit the blocks,
    other tensors in F16 (1-D in F32), tensors of more than 4 dimensions flattened with
    ``comfy.gguf.orig_shape``."""
    w = gguf.GGUFWriter(str(path), "wan")
    for key, t in sd.items():
        name = PREFIX + key.removeprefix("diffusion_model.")
        a = t.float().numpy()
        if a.ndim == 2 and a.shape[1] % 32 == 0 and key.endswith(".weight"):
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        elif a.ndim == 1:
            w.add_tensor(name, a)
        else:
            if a.ndim > 4:
                w.add_array(f"comfy.gguf.orig_shape.{name}", list(a.shape))
                a = a.reshape(a.shape[0], -1)
            w.add_tensor(name, a.astype(np.float16))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def test_files_node_on_gguf_bases_equals_the_dequantized_safetensors_run(nodes_by_id: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy_host
    import folder_paths
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    src = comfy_host.build_model("WAN21_T2V", WAN_GGUF_CONFIG, seed=0)
    tgt = comfy_host.perturbed_copy(src, 0.05, seed=3)
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "loras").mkdir()
    for label, model in (("wan21", src), ("wan22_low", tgt)):
        g = GGUFWeights(write_state_gguf(models / "diffusion_models" / f"{label}.gguf", comfy_host.unet_weights(model), Q.Q8_0))
        # the same weights, dequantized, as a diffusion-model safetensors file (no metadata: ComfyUI's detection)
        save_file({k: g.get(k) for k in g.keys()}, str(models / "diffusion_models" / f"{label}.safetensors"))
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for m in ("blocks.0.self_attn.q", "blocks.0.cross_attn.v", "blocks.0.ffn.0"):
        w = src.model.state_dict()[f"diffusion_model.{m}.weight"]
        name = "lora_unet_" + m.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = 0.1 * torch.randn(4, w.shape[1], generator=gen)
        lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn(w.shape[0], 4, generator=gen)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(models / "loras" / "wan_style.safetensors"))
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    node = nodes_by_id["ProLoRATransferLoRAFiles"]
    try:
        options = next(i for i in node.define_schema().inputs if i.id == "target_model").options
        assert {"diffusion_models/wan21.gguf", "diffusion_models/wan22_low.gguf"} <= set(options)
        outs = {}
        for ext in ("gguf", "safetensors"):
            names, report = node.execute(source_model=f"diffusion_models/wan21.{ext}", target_model=f"diffusion_models/wan22_low.{ext}",
                                         lora_name="wan_style.safetensors", more_loras="", mode="prolora", subspace_rank=0, threshold=0.0,
                                         pairing="name", filename_pattern="{lora}_" + ext, device="cpu").args
            assert re.search(r"3 modules\n\s+3 transferred", report) and f"wan21.{ext} → wan22_low.{ext}" in report, report
            outs[ext] = load_file(str(models / "loras" / names.strip()))
    finally:
        for folder in ("diffusion_models", "loras"):
            folder_paths.folder_names_and_paths[folder][0].remove(str(models / folder))
    assert set(outs["gguf"]) == set(outs["safetensors"]) and len(outs["gguf"]) == 9
    for k, v in outs["gguf"].items():
        torch.testing.assert_close(v, outs["safetensors"][k], rtol=1e-5, atol=1e-6)
