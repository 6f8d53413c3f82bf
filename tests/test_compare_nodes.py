"""Compare and Report nodes, in-process on real tensors: the labelled grid (sizes, dtype, range, labels
drawn, odd inputs), the distances, the temp-folder ui images, the block grouping (one
implementation, sent to the web panel with the match rows), and the Report picture of a real
MatchHandle built by the real Compute Basis / Match Modules / Project LoRA nodes on tiny models,
with the norms of the projection Project LoRA made."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import comfy_host

MODULES = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "middle_block.1.transformer_blocks.0.ff.net.2",
    "output_blocks.2.1.transformer_blocks.0.attn1.to_v",
]


@pytest.fixture(scope="module")
def cmp(pack: Any) -> Any:
    return sys.modules[pack.__name__ + ".nodes.compare_grid"]


@pytest.fixture(scope="module")
def rep(pack: Any) -> Any:
    return sys.modules[pack.__name__ + ".nodes.match_report"]


@pytest.fixture(scope="module")
def blk(pack: Any) -> Any:
    return sys.modules[pack.__name__ + ".nodes.blocks"]


def _image(b: int, h: int, w: int, seed: int = 0, c: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((b, h, w, c), generator=gen)


def _compare(nodes_by_id: dict[str, Any], labels: str, *images: torch.Tensor) -> tuple[torch.Tensor, str, dict[str, Any]]:
    kwargs = {f"image_{i + 1}": img for i, img in enumerate(images)}
    out = nodes_by_id["ProLoRACompare"].execute(labels=labels, **kwargs)
    grid, text = out.args
    return grid, text, out.ui


def _check_image(t: torch.Tensor) -> None:
    assert t.dtype == torch.float32 and t.ndim == 4 and t.shape[0] == 1 and t.shape[-1] == 3, (t.dtype, t.shape)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.isfinite(t).all()


def _band_has_text(cmp: Any, grid: torch.Tensor, layout: Any, column: int) -> bool:
    """Bright (text) pixels in the label band above ``column``."""
    x = layout.gap + column * (layout.cell[1] + layout.gap)
    band = grid[0, : layout.band, x: x + layout.cell[1]]
    return bool((band.mean(dim=-1) > 0.6).sum() >= 5)


def test_both_nodes_have_tooltips_on_every_input_and_output(nodes_by_id: dict[str, Any]) -> None:
    for node_id in ("ProLoRACompare", "ProLoRAReportImage"):
        schema = nodes_by_id[node_id].define_schema()
        assert schema.category == "ProLoRA" and schema.is_output_node
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{node_id}.{getattr(item, 'id', None) or item.display_name} has no tooltip"
    inputs = [i.id for i in nodes_by_id["ProLoRACompare"].define_schema().inputs]
    assert inputs == ["image_1", "image_2", "image_3", "image_4", "image_5", "image_6", "labels"]


def test_grid_layout_labels_dtype_and_range(nodes_by_id: dict[str, Any], cmp: Any, comfy_dirs: Path) -> None:
    a, b = _image(2, 40, 56, 1), _image(2, 40, 56, 2)
    grid, text, ui = _compare(nodes_by_id, "base\nProLoRA", a, b)
    _check_image(grid)
    font = cmp.label_font(56)
    layout = cmp.GridLayout(cell=(40, 56), band=cmp.label_band_height(font), rows=2, columns=2)
    assert layout.band > 8  # the label band is part of the grid size
    assert tuple(grid.shape[1:3]) == layout.size == (layout.band + 2 * 40 + 3 * cmp.GAP, 2 * 56 + 3 * cmp.GAP)
    for col in range(2):
        assert _band_has_text(cmp, grid, layout, col)
    for row, col, src in ((0, 0, a[0]), (1, 0, a[1]), (0, 1, b[0]), (1, 1, b[1])):
        y, x = layout.cell_origin(row, col)
        assert torch.equal(grid[0, y: y + 40, x: x + 56], src)  # same-size inputs are placed unchanged
    assert "base vs ProLoRA" in text and "rmse" in text and "colour" in text and "structure" in text
    panel = ui["prolora_compare"][0]
    assert panel["labels"] == ["base", "ProLoRA"] and panel["index"] == [[0, 1], [2, 3]] and panel["batch"] == [2, 2]
    assert len(ui["images"]) == 4
    for saved in ui["images"]:
        assert saved["type"] == "temp"
        assert (comfy_dirs / "temp" / saved["subfolder"] / saved["filename"]).is_file()


def test_labels_without_text_do_not_draw(cmp: Any) -> None:
    cell = torch.zeros((1, 30, 60, 3))
    grid, layout = cmp.make_grid([cell, cell], ["", "x"])
    assert not _band_has_text(cmp, grid, layout, 0) and _band_has_text(cmp, grid, layout, 1)


def test_different_sizes_are_fitted_and_padded_to_a_common_cell(nodes_by_id: dict[str, Any], cmp: Any, comfy_dirs: Path) -> None:
    tall, wide = torch.ones((1, 64, 32, 3)), torch.ones((1, 24, 96, 3)) * 0.5
    grid, text, ui = _compare(nodes_by_id, "tall, wide", tall, wide)
    _check_image(grid)
    font = cmp.label_font(96)
    layout = cmp.GridLayout(cell=(64, 96), band=cmp.label_band_height(font), rows=1, columns=2)
    assert tuple(grid.shape[1:3]) == layout.size
    y, x = layout.cell_origin(0, 0)
    cell = grid[0, y: y + 64, x: x + 96]
    assert torch.allclose(cell[:, 32:64], torch.ones(64, 32, 3))  # the tall image, centred, unscaled
    assert torch.allclose(cell[:, :32], torch.tensor(cmp.BACKGROUND).expand(64, 32, 3))  # padding
    y, x = layout.cell_origin(0, 1)
    cell = grid[0, y: y + 64, x: x + 96]
    assert torch.allclose(cell[20:44], torch.full((24, 96, 3), 0.5), atol=1e-6)
    assert ui["prolora_compare"][0]["cell"] == [64, 96]
    assert "tall vs wide" in text


def test_huge_inputs_are_scaled_down(cmp: Any) -> None:
    assert cmp.common_cell([(4096, 1024), (512, 512)]) == (2048, 512)
    fitted = cmp.fit_to_cell(torch.ones((1, 100, 50, 3)), (20, 20))
    assert fitted.shape == (1, 20, 20, 3) and float(fitted.max()) <= 1.0


def test_one_branch_batch_of_one_and_odd_channels(nodes_by_id: dict[str, Any], cmp: Any, comfy_dirs: Path) -> None:
    grid, text, ui = _compare(nodes_by_id, "", _image(1, 16, 16, 3))
    _check_image(grid)
    assert "nothing to compare" in text and ui["prolora_compare"][0]["labels"] == ["image_1"]
    grey, rgba = _image(1, 16, 16, 4, c=1), _image(3, 16, 16, 5, c=4) * 1.5 - 0.2  # out-of-range values are clamped
    grid, text, ui = _compare(nodes_by_id, "grey", grey, rgba)
    _check_image(grid)
    assert ui["prolora_compare"][0]["labels"] == ["grey", "image_2"]
    assert ui["prolora_compare"][0]["batch"] == [1, 3]
    assert "(1 item)" in text  # distances pair batch items by index: only one pair here
    layout = cmp.GridLayout(cell=(16, 16), band=cmp.label_band_height(cmp.label_font(16)), rows=3, columns=2)
    assert tuple(grid.shape[1:3]) == layout.size
    y, x = layout.cell_origin(2, 0)
    assert torch.allclose(grid[0, y: y + 16, x: x + 16], torch.tensor(cmp.BACKGROUND).expand(16, 16, 3))  # missing item: empty


def test_six_branches_and_label_parsing(nodes_by_id: dict[str, Any], cmp: Any, comfy_dirs: Path) -> None:
    images = [_image(1, 8 + 4 * i, 12, i) for i in range(6)]
    grid, text, ui = _compare(nodes_by_id, "a, b ,c", *images)
    _check_image(grid)
    panel = ui["prolora_compare"][0]
    assert panel["labels"] == ["a", "b", "c", "image_4", "image_5", "image_6"]
    assert len(panel["pairs"]) == 15 and [p["b"] for p in panel["pairs"][:5]] == [1, 2, 3, 4, 5]  # reference pairs first
    assert text.index("vs reference:") < text.index("a vs image_6") < text.index("other pairs:") < text.index("b vs c")
    assert cmp.parse_labels("x\n\ny\n", 3) == ["x", "image_2", "y"]
    assert cmp.parse_labels("one, two", 1) == ["one"]


def test_distances_are_zero_for_equal_images_and_one_for_opposites(cmp: Any) -> None:
    img = _image(1, 32, 32, 7)[0]
    d = cmp.image_distances(img, img.clone())
    assert d == {"rmse": 0.0, "colour": 0.0, "structure": 0.0}
    black, white = torch.zeros((32, 32, 3)), torch.ones((32, 32, 3))
    d = cmp.image_distances(black, white)
    assert d["rmse"] == pytest.approx(1.0) and d["colour"] == pytest.approx(1.0) and d["structure"] == 0.0
    checker = ((torch.arange(32)[:, None] // 4 + torch.arange(32)[None, :] // 4) % 2).float()[..., None].expand(32, 32, 3)
    assert cmp.image_distances(checker, torch.full((32, 32, 3), 0.5))["structure"] == pytest.approx(1.0)
    shifted = torch.roll(checker, 1, dims=1)
    d_shift, d_noise = cmp.image_distances(checker, shifted), cmp.image_distances(checker, (checker + 0.05).clamp(0, 1))
    assert d_noise["rmse"] < d_shift["rmse"] and d_noise["structure"] < 0.05


# --------------------------------------------------------------------------------------
# Report on a real match
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transfer(nodes_by_id: dict[str, Any], comfyui: Any) -> dict[str, Any]:
    """Real bases of a tiny SD1.5 model and a partly re-initialised descendant: the output blocks are
    new weights, so some modules pass the threshold and others are skipped."""
    src = comfy_host.tiny_sd15_model(0)
    tgt = comfy_host.tiny_sd15_model(0)
    fresh = comfy_host.tiny_sd15_model(11)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (name, p_s), p_t, p_f in zip(src.model.named_parameters(), tgt.model.parameters(), fresh.model.parameters()):
            p_t.copy_(p_f if "output_blocks" in name else p_s + 0.05 * p_s.abs().mean() * torch.randn(p_s.shape, generator=gen))

    def run(node_id: str, **kw: Any) -> Any:
        return nodes_by_id[node_id].execute(**kw)

    (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False).args
    (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False).args
    lora = comfy_host.kohya_lora(src, MODULES, alpha=2.0)
    match = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.6, pairing="name")
    return {"bs": bs, "bt": bt, "lora": lora, "match": match.args[0], "ui": match.ui, "run": run}


def test_report_groups_modules_by_block(blk: Any) -> None:
    cases = {
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": ("in 4", "attn2.to_k"),
        "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": ("mid", "ff.net.0.proj"),
        "diffusion_model.middle_block.0.in_layers.2.weight": ("mid", "in_layers.2"),
        "diffusion_model.output_blocks.11.0.skip_connection.weight": ("out 11", "skip_connection"),
        "diffusion_model.time_embed.0.weight": ("time_embed", "time_embed.0"),
        "diffusion_model.input_blocks.0.0.weight": ("in 0", "conv"),
        "diffusion_model.double_blocks.3.img_attn.qkv.weight": ("double 3", "img_attn.qkv"),
    }
    for key, expected in cases.items():
        assert blk.split_key("unet", key)[1:] == expected, key
    assert blk.split_key("clip", "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")[1:] == ("clip:L 0", "self_attn.q_proj")
    order = [blk.split_key("unet", f"diffusion_model.{k}.weight")[0] for k in ("input_blocks.1.0.x", "input_blocks.10.0.x", "middle_block.1.x",
                                                                                 "output_blocks.0.0.x")]
    assert order == sorted(order)


def test_match_panel_payload_carries_the_block_grouping(transfer: dict[str, Any], blk: Any) -> None:
    """The web panel draws its strip from ``block``/``order`` in the rows Match Modules sends: the
    same grouping and model order as the Report picture (the panel has no grouping of its own)."""
    payload = transfer["ui"]["prolora_match"][0]
    rows = payload["rows"]
    assert len(rows) == len(MODULES) and sorted(r["order"] for r in rows) == list(range(len(rows)))
    ordered = sorted(rows, key=lambda r: r["order"])
    assert [r["source"] for r in ordered] == [r["source"] for r in blk.module_order(rows)]
    for r in rows:
        assert r["block"] == blk.split_key(r["part"], r["source"])[1]
    assert [r["block"] for r in ordered] == ["in 1"] * 4 + ["mid", "out 2"]
    import json

    json.dumps(payload)  # what ComfyUI sends over the websocket


def _project(run: Any, lora: Any, match: Any, mode: str = "prolora-full", out_rank: int = 0, rescale: bool = False) -> tuple[Any, str]:
    out, report = run("ProLoRAProjectLoRA", lora=lora, match=match, mode=mode, out_rank=out_rank, rescale_to_source_norm=rescale).args
    return out, report


def test_report_image_of_a_real_match_with_the_projection_project_lora_made(transfer: dict[str, Any], rep: Any, blk: Any,
                                                                             comfy_dirs: Path) -> None:
    match, lora, run = transfer["match"], transfer["lora"], transfer["run"]
    rows = match.rows()
    assert 0 < sum(r["passes"] for r in rows) < len(rows), [(r["source"], r["phi_u"], r["phi_v"]) for r in rows]
    projected, report = _project(run, lora, match)
    out = run("ProLoRAReportImage", match=match, lora=projected)
    (image,) = out.args
    _check_image(image)
    assert tuple(image.shape) == (1, rep.REPORT_SIZE[1], rep.REPORT_SIZE[0], 3)
    assert float(image.std()) > 0.05
    assert out.ui.as_dict()["images"][0]["type"] == "temp"
    data = rep.report_data(match, projected)
    assert len(data.norms) == len(MODULES) and {n["transferred"] for n in data.norms} == {True, False}
    done = [n for n in data.norms if n["transferred"]]
    ratio = sum(n["transferred_norm"] ** 2 for n in done) ** 0.5 / sum(n["source_norm"] ** 2 for n in done) ** 0.5
    assert data.norm_ratio == pytest.approx(ratio)
    assert f"overall norm ratio transferred/source: {ratio:.3f}" in report  # the same projection as Project LoRA's
    assert f"{len(done)}/{len(MODULES)} modules transferred" in report and data.projection == "mode prolora-full"
    blocks, kinds, cells = blk.module_grid(data.rows)
    assert blocks == ["in 1", "mid", "out 2"] and "attn1.to_q" in kinds
    assert cells[("out 2", "attn1.to_v")].passes == [False]
    artifacts = comfy_host.REPO_ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(artifacts / "report_image.png")


def test_report_norms_follow_out_rank_and_rescale(transfer: dict[str, Any], rep: Any, comfy_dirs: Path) -> None:
    """The report used to re-project with its own config and drop out_rank/rescale: its norms could
    disagree with the LoRA Project LoRA wrote. Now they are that LoRA's, whatever its options."""
    match, lora, run = transfer["match"], transfer["lora"], transfer["run"]
    plain, _ = _project(run, lora, match, "prolora")
    rescaled, report = _project(run, lora, match, "prolora", rescale=True)
    squeezed, report2 = _project(run, lora, match, "prolora", out_rank=1)
    d_plain, d_rescaled, d_squeezed = (rep.report_data(match, x) for x in (plain, rescaled, squeezed))
    assert "overall norm ratio transferred/source: 1.000" in report and d_rescaled.norm_ratio == pytest.approx(1.0)
    assert d_rescaled.projection == "mode prolora, rescaled to source norm"
    for d, lm in ((d_plain, plain), (d_rescaled, rescaled), (d_squeezed, squeezed)):
        for n, m in zip(d.norms, lm.projection):
            assert n["transferred_norm"] == m.transferred_norm and n["source_norm"] == m.source_norm
    moved = [i for i, n in enumerate(d_plain.norms) if n["transferred"]]
    dropped = float(squeezed.metadata["prolora.energy_dropped"])
    assert dropped > 0 and d_squeezed.projection == f"mode prolora, out_rank 1 ({1 - dropped:.1%} of the energy kept)"
    assert any(abs(d_rescaled.norms[i]["transferred_norm"] - d_plain.norms[i]["transferred_norm"]) > 1e-6 for i in moved)
    assert f"overall norm ratio transferred/source: {d_squeezed.norm_ratio:.3f}" in report2
    (image,) = run("ProLoRAReportImage", match=match, lora=squeezed).args
    _check_image(image)


def test_report_refuses_a_lora_project_lora_did_not_make(transfer: dict[str, Any], pack: Any, comfy_dirs: Path) -> None:
    error = sys.modules[pack.__name__ + ".prolora_core.errors"].ProLoRAError
    run, match, lora = transfer["run"], transfer["match"], transfer["lora"]
    with pytest.raises(error, match="Project LoRA made"):
        run("ProLoRAReportImage", match=match, lora=lora)  # the source LoRA, not a projection
    projected, _ = _project(run, lora, match)
    (bs2,) = run("ProLoRAComputeBasis", model=comfy_host.tiny_sd15_model(0), clip=None, subspace_rank=0, device="cpu", use_cache=False,
                 name="other").args
    (other, _) = run("ProLoRAMatchModules", source_basis=bs2, target_basis=transfer["bt"], lora=lora, threshold=0.6, pairing="name").args
    with pytest.raises(error, match="connect the same match"):
        run("ProLoRAReportImage", match=other, lora=projected)


def test_report_image_of_every_module_without_lora(transfer: dict[str, Any], rep: Any, blk: Any, comfy_dirs: Path) -> None:
    run = transfer["run"]
    (match, _) = run("ProLoRAMatchModules", source_basis=transfer["bs"], target_basis=transfer["bt"], lora=None, threshold=0.6,
                     pairing="name").args
    data = rep.report_data(match)
    assert data.norms is None and data.projection is None and len(data.rows) > 20
    blocks, _, _ = blk.module_grid(data.rows)
    assert blocks.index("in 1") < blocks.index("mid") < blocks.index("out 0")
    (image,) = run("ProLoRAReportImage", match=match, lora=None).args
    _check_image(image)
    assert float(image.std()) > 0.05
    artifacts = comfy_host.REPO_ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(artifacts / "report_all_modules.png")
