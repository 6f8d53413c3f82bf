"""Wan 2.1 → Wan 2.2, Qwen-Image → Qwen-Image-Edit, and the fused-qkv families (SD3, Z-Image,
HunyuanVideo) through the nodes (Compute Basis → Match Modules → Project LoRA), on tiny models built
from ComfyUI's own classes (tests/family_models.py).

LoRA layouts, each placed by ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``):

* Wan, musubi-tuner: ``lora_unet_blocks_0_self_attn_q`` with alpha, without and with the modulation
  layer (``time_projection.1``); Wan, ComfyUI/ai-toolkit PEFT: ``diffusion_model.blocks.0.self_attn.q.lora_A``
  without alpha. Diffusers' own Wan names (``transformer.blocks.0.attn1.to_q``) are in no ComfyUI 0.3.75
  map: ComfyUI loads nothing of such a file, and the pack says so;
* Qwen-Image, diffusers/PEFT: ``transformer_blocks.0.attn.to_q`` (and ``transformer.``-prefixed),
  without and with ``img_mod.1``/``txt_mod.1``; musubi-tuner: ``lora_unet_transformer_blocks_0_attn_to_q``;
* SD3 kohya (``lora_unet_joint_blocks_0_x_block_attn_qkv``), Z-Image kohya (``lora_unet_layers_0_attention_qkv``),
  HunyuanVideo diffusion-pipe (``transformer.double_blocks.0.img_attn_qkv``): LoRAs on the whole fused
  weights; SD3 diffusers (``transformer.transformer_blocks.0.attn.to_q``, ``add_q_proj``) and Z-Image
  diffusers (``diffusion_model.layers.0.attention.to_q``), which ComfyUI applies to rows of the fused
  ``qkv``: each slice with its own bases (``prolora_core/slices.py``). HunyuanVideo's diffusers names
  are in no ComfyUI 0.3.75 key map.

Each: ``copy`` output applied by ComfyUI changes the target exactly as the input file does;
``prolora-full`` with target = source gives the input's change back; on a perturbed target every
module (each slice on its rows) matches the dense float64 reference (tests/reference.py), and rows no
module sits on stay as they were. Wan 2.1 → both Wan 2.2 A14B experts
from one LoRA; and a pair of models whose shapes cannot match gets one message naming both.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import comfy_host
import family_models as fm
from reference import reference_transfer

RANK, ALPHA = 4, 2.0
WAN_BLOCK = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
             "ffn.0", "ffn.2"]
QWEN_BLOCK = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
              "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.2"]
QWEN_MOD = ["img_mod.1", "txt_mod.1"]


def _musubi(modules: list[str]) -> list[str]:
    return ["lora_unet_" + m.replace(".", "_") for m in modules]


WAN_BLOCKS = [f"blocks.{i}.{m}" for i in range(2) for m in WAN_BLOCK]
QWEN_BLOCKS = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in QWEN_BLOCK]
QWEN_MODS = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in QWEN_MOD]
#: layout → (family, LoRA module names, PEFT lora_A/lora_B without alpha?)
LAYOUTS: dict[str, tuple[str, list[str], bool]] = {
    "wan-musubi": ("wan21_14b", _musubi(WAN_BLOCKS), False),
    "wan-musubi-mod": ("wan21_14b", _musubi(WAN_BLOCKS + ["time_projection.1"]), False),
    "wan-comfy-peft": ("wan21_14b", ["diffusion_model." + m for m in WAN_BLOCKS], True),
    "qwen-diffusers": ("qwen_image", QWEN_BLOCKS, True),
    "qwen-diffusers-mod": ("qwen_image", ["transformer." + m for m in QWEN_BLOCKS + QWEN_MODS], True),
    "qwen-musubi": ("qwen_image", _musubi(QWEN_BLOCKS), False),
    "qwen-musubi-mod": ("qwen_image", _musubi(QWEN_BLOCKS + QWEN_MODS), False),
    "sd3-kohya": ("sd3", _musubi(["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
                                  "joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.adaLN_modulation.1"]), False),
    "zimage-kohya": ("z_image", _musubi(["layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w1",
                                         "layers.0.feed_forward.w2", "layers.0.adaLN_modulation.0"]), False),
    "sd3-diffusers": ("sd3", ["transformer.transformer_blocks.0." + m for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "ff.net.0.proj",
        "ff.net.2")], True),
    "zimage-diffusers": ("z_image", ["diffusion_model.layers.0." + m for m in ("attention.to_q", "attention.to_k", "attention.to_v",
                                                                               "attention.to_out.0", "feed_forward.w1", "feed_forward.w3",
                                                                               "adaLN_modulation.0")], True),
    "hunyuan-diffusion-pipe": ("hunyuan_video", ["transformer.double_blocks.0.img_attn_qkv", "transformer.double_blocks.0.txt_attn_qkv",
                                                 "transformer.double_blocks.0.img_attn_proj", "transformer.double_blocks.0.img_mod.linear",
                                                 "transformer.single_blocks.0.linear1", "transformer.single_blocks.0.modulation.linear"], True),
}
WAN_QWEN = [k for k in LAYOUTS if k.startswith(("wan", "qwen"))]
FUSED = [k for k in LAYOUTS if k not in WAN_QWEN]


# --------------------------------------------------------------------------------------
# Models, LoRAs, ComfyUI's application, the nodes
# --------------------------------------------------------------------------------------

Pairs = Callable[[str], tuple[Any, Any]]


@pytest.fixture(scope="module")
def pair(comfyui: Any) -> Iterator[Pairs]:
    """``pair(family)``: the tiny model of ``family`` and a fine-tuned-like descendant (every weight
    + 5 % noise), built once per module."""
    built: dict[str, tuple[Any, Any]] = {}

    def get(family: str) -> tuple[Any, Any]:
        if family not in built:
            src = fm.tiny_model(family)
            built[family] = (src, fm.descendant(src, 0.05, seed=11))
        return built[family]

    yield get
    built.clear()


def raises_prolora(match: str) -> Any:
    """``pytest.raises`` for the pack's ProLoRAError (the pack is imported under ComfyUI's module
    name, so its class is not the test's ``prolora_core.errors.ProLoRAError``)."""
    return pytest.raises(Exception, match=match)


def is_prolora_error(err: BaseException) -> bool:
    return type(err).__name__ == "ProLoRAError"


Place = tuple[str, "tuple[int, int] | None"]


def place(model: Any, name: str) -> Place:
    """Where ComfyUI's key map puts a LoRA module: ``(weight key, None)`` for a whole weight, or
    ``(weight key, (start, length))`` for rows of a fused one (SD3's and Z-Image's diffusers
    ``to_q``/``to_k``/``to_v`` on ``qkv``). Checked to be one of the two."""
    import comfy.lora

    target = comfy.lora.model_lora_keys_unet(model.model, {}).get(name)
    if isinstance(target, str):
        return target, None
    assert isinstance(target, tuple) and len(target) == 2 and target[1][0] == 0, f"{name}: ComfyUI maps it to {target!r}"
    return target[0], (target[1][1], target[1][2])


def view(w: Any, where: Place) -> Any:
    """The rows of a whole weight (or weight change) a module sits on."""
    rows = where[1]
    return w if rows is None else w[rows[0]:rows[0] + rows[1]]


def make_lora(model: Any, layout: str, seed: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    _, names, peft = LAYOUTS[layout]
    sd = model.model.state_dict()
    shapes = {name: tuple(view(sd[place(model, name)[0]], place(model, name)).shape) for name in names}
    return comfy_host.factor_lora(shapes, peft=peft, rank=RANK, alpha=ALPHA, scale=scale, seed=seed)  # type: ignore[arg-type]


def dense(lora: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """The module's ΔW in float64 (numpy), scale alpha/r (1 without alpha)."""
    return comfy_host.lora_delta(lora, name, ALPHA / RANK)


applied = comfy_host.applied_by_comfyui


_run = comfy_host.run_node


basis, project, transfer, default_k = comfy_host.node_basis, comfy_host.node_project, comfy_host.node_transfer, comfy_host.default_k


def no_key_warnings(caplog: pytest.LogCaptureFixture) -> None:
    missed = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not missed, missed[:5]


def check_against_reference(lora: dict, layout: str, src: Any, tgt: Any, out: dict, mode: str) -> None:
    """Each module's change of ``tgt`` under ComfyUI's loader equals the dense float64 reference."""
    before, after, src_sd = comfy_host.unet_weights(tgt), applied(tgt, out), comfy_host.unet_weights(src)
    covered: dict[str, np.ndarray] = {}
    for name in LAYOUTS[layout][1]:
        where = place(src, name)
        key = where[0]
        delta = dense(lora, name)
        want = reference_transfer(delta, view(src_sd[key].double().numpy(), where), view(before[key].double().numpy(), where),
                                  default_k(*delta.shape), mode)  # a slice with its own bases
        got = view((after[key] - before[key]).double().numpy(), where)
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), (layout, name, mode)
        mask = covered.setdefault(key, np.zeros(before[key].shape[0], dtype=bool))
        mask[view(np.arange(len(mask)), where)] = True
    for key in before:  # weights and rows no module sits on stay as they were
        rest = torch.from_numpy(~covered[key]) if key in covered else slice(None)
        assert torch.equal(after[key][rest], before[key][rest]), key


# --------------------------------------------------------------------------------------
# Each layout: copy parity, identity, the dense reference
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_copy_output_applies_in_comfyui_exactly_as_the_input(nodes_by_id: dict[str, Any], pair: Pairs, layout: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = pair(LAYOUTS[layout][0])
    lora = make_lora(src, layout)
    out, _, report = transfer(nodes_by_id, src, tgt, lora, "copy")
    n = len(LAYOUTS[layout][1])
    assert f"{n}/{n} modules transferred" in report, report
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, out)
    no_key_warnings(caplog)
    before = comfy_host.unet_weights(tgt)
    changed = {k for k in before if not torch.equal(before[k], want[k])}
    assert changed == {k for k in before if not torch.equal(before[k], got[k])} == {place(src, m)[0] for m in LAYOUTS[layout][1]}
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", WAN_QWEN + FUSED[:1])
def test_target_equal_to_source_gives_the_input_back(nodes_by_id: dict[str, Any], pair: Pairs, layout: str) -> None:
    src, _ = pair(LAYOUTS[layout][0])
    lora = make_lora(src, layout, seed=2)
    out, _, _ = transfer(nodes_by_id, src, src, lora, "prolora-full")
    comfy_host.assert_same_change(comfy_host.unet_weights(src), applied(src, lora), applied(src, out))


@pytest.mark.parametrize("mode", ["prolora-full", "prolora", "subspace"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_module_matches_the_dense_reference(nodes_by_id: dict[str, Any], pair: Pairs, layout: str, mode: str) -> None:
    src, tgt = pair(LAYOUTS[layout][0])
    lora = make_lora(src, layout, seed=3)
    out, _, _ = transfer(nodes_by_id, src, tgt, lora, mode)
    check_against_reference(lora, layout, src, tgt, out, mode)


def test_diffusers_wan_names_are_in_no_comfyui_map_and_the_pack_says_so(nodes_by_id: dict[str, Any], pair: Pairs,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """``transformer.blocks.0.attn1.to_q`` (diffusers' WanTransformer3DModel): ComfyUI 0.3.75 loads none
    of it (it logs every key as not loaded); the pack refuses the LoRA with the same verdict."""
    src, tgt = pair("wan21_14b")
    gen = torch.Generator().manual_seed(4)
    lora = {f"transformer.blocks.0.{m}.lora_{ab}.weight": 0.1 * torch.randn(*shape, generator=gen)
            for m in ("attn1.to_q", "attn2.to_k", "ffn.net.0.proj") for ab, shape in (("A", (RANK, 64)), ("B", (64, RANK)))}
    with caplog.at_level(logging.WARNING):
        after = applied(tgt, lora)
    assert len([r for r in caplog.records if "lora key not loaded" in r.getMessage()]) == len(lora)
    before = comfy_host.unet_weights(tgt)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with raises_prolora(r"none of the LoRA's 3 modules maps onto the source model \(WAN21_T2V\)") as info:
        transfer(nodes_by_id, src, tgt, lora, "copy")
    assert is_prolora_error(info.value)


# --------------------------------------------------------------------------------------
# Wan 2.1 → both Wan 2.2 A14B experts from one LoRA
# --------------------------------------------------------------------------------------

def test_wan21_lora_to_both_wan22_experts(nodes_by_id: dict[str, Any], pair: Pairs, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One Wan 2.1 LoRA, one source basis, two targets (the high-noise and the low-noise expert): each
    output matches the dense reference against its own expert; the source's bases are computed once
    (the second match takes them from the cache)."""
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    wan21, _ = pair("wan21_14b")
    high, low = fm.wan22_experts_from(wan21)
    layout = "wan-musubi"
    lora = make_lora(wan21, layout, seed=5)
    bs = basis(nodes_by_id, wan21, cache=True)
    n = len(LAYOUTS[layout][1])
    outs = {}
    for label, expert in (("high", high), ("low", low)):
        out, summary, report = project(nodes_by_id, bs, basis(nodes_by_id, expert, cache=True), lora, "prolora")
        assert f"{n}/{n} modules transferred" in report, report
        computed = n if label == "low" else 2 * n  # the low-noise run computes only its own target's bases
        assert f"bases computed: {computed}, from cache: {2 * n - computed}" in summary, summary
        check_against_reference(lora, layout, wan21, expert, out, "prolora")
        outs[label] = out
    key = "blocks.0.self_attn.q.lora_up.weight"
    name = next(k for k in outs["high"] if k.endswith(key) or k.endswith(key.replace(".", "_", 2)))
    assert not torch.equal(outs["high"][name], outs["low"][name]), "each expert gets its own projection"


# --------------------------------------------------------------------------------------
# Shapes that cannot match: one message naming both models
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_family, target_class", [("wan21_1.3b", "WAN21_T2V"), ("wan22_5b", "WAN22_T2V")])
def test_wan14b_lora_on_another_wan_size_gets_one_message(nodes_by_id: dict[str, Any], pair: Pairs, target_family: str, target_class: str) -> None:
    src, _ = pair("wan21_14b")
    tgt = fm.tiny_model(target_family)
    lora = make_lora(src, "wan-musubi", seed=6)
    bs, bt = basis(nodes_by_id, src), basis(nodes_by_id, tgt)
    with raises_prolora("shapes differ") as info:
        project(nodes_by_id, bs, bt, lora, "prolora")
    msg = str(info.value)
    assert is_prolora_error(info.value)
    assert msg.count("\n") == 0, msg
    src_size, tgt_size = f"{fm.parameter_count(src) / 1e6:.2f} M parameters", f"{fm.parameter_count(tgt) / 1e6:.2f} M parameters"
    assert f"WAN21_T2V ({src_size}, dim 64)" in msg and f"{target_class} ({tgt_size}, dim {fm.FAMILIES[target_family][1]['dim']})" in msg, msg
    assert "shapes differ: this method needs same-shape models" in msg, msg


def test_qwen_source_and_wan_target_get_one_message(nodes_by_id: dict[str, Any], pair: Pairs) -> None:
    src, _ = pair("qwen_image")
    wan, _ = pair("wan21_14b")
    lora = make_lora(src, "qwen-musubi", seed=7)
    with raises_prolora(r"source model is QwenImage \(.* M parameters\).*target model is WAN21_T2V \(.* M parameters, dim 64\)"
                                           r".*none of the LoRA's 22 modules.*shapes differ") as info:
        project(nodes_by_id, basis(nodes_by_id, src), basis(nodes_by_id, wan), lora, "copy")
    assert is_prolora_error(info.value)
