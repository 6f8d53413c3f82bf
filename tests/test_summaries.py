"""What a user reads and finds after a transfer: summaries whose groups add up to the LoRA's
modules (CLI, Transfer LoRA (files), Match Modules), the similarity-pairing hint on renumbered
models checked against a real similarity run, similarity candidates kept inside one model part and
one kind of weight, outputs named after the target next to their input, the basis cache's limit
and clearing from the nodes, and the CPU thread default."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_files import decaying_weight, make_updates, read_report, run_main, write_base, write_lora
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO = REPO_ROOT / "zoo"
EXACT = ["--no-cache", "--device", "cpu", "--basis-method", "exact", "--compute-dtype", "float64", "--subspace-rank", "4"]
KINDS = {"attn.to_q": (24, 40), "ff.net": (40, 24)}
TE_MODULE = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def group_lines(text: str) -> tuple[int, dict[str, int]]:
    """``(N, {label: count})`` from a printed summary: ``name: N modules`` then ``  count label`` lines."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if re.fullmatch(r"\S.*: \d+ modules", line))
    total = int(lines[head].rsplit(" ", 2)[1])
    groups = {}
    for line in lines[head + 1:]:
        m = re.fullmatch(r"  +(\d+) (.+)", line)
        if not m:
            break
        groups[m.group(2)] = int(m.group(1))
    return total, groups


def renumbered_pair(folder: Path) -> tuple[Path, Path]:
    """Source blocks 0-3 (an attention and a feed-forward weight each); the target drops block 1
    and renumbers blocks 2, 3 to 1, 2 (a pruned model, like SSD-1B from SDXL)."""
    rng = np.random.default_rng(3)
    ws = {f"blocks.{b}.{kind}": decaying_weight(rng, shape) for b in range(4) for kind, shape in KINDS.items()}
    wt = {}
    for b_src, b_tgt in ((0, 0), (2, 1), (3, 2)):
        for kind in KINDS:
            w = ws[f"blocks.{b_src}.{kind}"]
            wt[f"blocks.{b_tgt}.{kind}"] = (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32)
    return write_base(folder / "source.safetensors", ws), write_base(folder / "pruned.safetensors", wt)


def renumbered_lora(path: Path, text_encoder: bool = True) -> Path:
    modules = {f"blocks.{b}.{kind}": shape for b in range(4) for kind, shape in KINDS.items()}
    modules["blocks.9.attn.to_q"] = (24, 40)  # no such weight in the source either
    updates = make_updates(seed=4, modules=modules)
    extra = {}
    if text_encoder:
        gen = torch.Generator().manual_seed(5)
        extra = {f"{TE_MODULE}.lora_up.weight": torch.randn((64, 2), generator=gen), f"{TE_MODULE}.lora_down.weight": torch.randn((2, 32), generator=gen)}
    return write_lora(path, updates, "underscore", extra=extra)


def test_cli_summary_adds_up_and_the_hint_is_what_similarity_pairing_places(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = renumbered_pair(tmp_path)
    lora = renumbered_lora(tmp_path / "loras" / "ink.safetensors")
    runs = {}
    for pairing in ("name", "similarity"):
        report = tmp_path / f"{pairing}.json"
        rc, out, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", lora, "--pairing", pairing,
                                 "--report", report, *EXACT], capsys)
        assert rc == 0, err
        runs[pairing] = (out, err, read_report(report))
    out, err, report = runs["name"]
    total, groups = group_lines(out)
    assert total == 10 == sum(groups.values()), out  # 8 blocks modules, one unknown, one text-encoder module
    assert groups == {
        "transferred (norm ratio " + re.search(r"transferred \(norm ratio (\d\.\d\d)\)", out).group(1) + ")": 2,  # type: ignore[union-attr]
        "below threshold (Φ < 0.8)": 4,  # blocks 1, 2 meet another block's weights
        "target has no such module (e.g. a removed block)": 2,  # block 3
        "not mapped: text-encoder modules (text-encoder names are not mapped from files yet)": 1,
        "not mapped: no weight of that name in the source model": 1,
    }, out
    summary = report["summary"]["loras"][str(lora)]
    assert sum(summary["groups"].values()) == summary["modules"] == 10
    # What similarity pairing really places of the modules name pairing skipped:
    by_name = {m["source"]: m for m in report["modules"]}
    by_sim = {m["source"]: m for m in runs["similarity"][2]["modules"]}
    gained = sorted(s for s, m in by_sim.items() if m["transferred"] and not by_name[s]["transferred"])
    assert gained == sorted(f"lora_unet_blocks_{b}_{k.replace('.', '_')}" for b in (2, 3) for k in KINDS)
    assert summary["similarity_may_place"] == len(gained) == 4
    assert "  → similarity pairing may place 4 of these 6 (pairing = similarity)" in out
    # Skipped modules name their best candidate and Φ: full precision in the JSON, rounded in the text.
    for b_src, b_tgt in ((2, 1), (3, 2)):
        row = by_name[f"lora_unet_blocks_{b_src}_attn_to_q"]
        assert row["target"] is None and row["candidate"] == f"blocks.{b_tgt}.attn.to_q" and row["candidate_phi"] > 0.95
        assert f"best candidate blocks.{b_tgt}.attn.to_q, Φ {row['candidate_phi']:.2f}" in err
        assert row["candidate_phi"] != round(row["candidate_phi"], 2)
    # The warnings give the real reason per kind of unmapped module.
    assert re.search(r"warning: 1 text-encoder modules are left out: text-encoder names are not mapped from files yet .*" + TE_MODULE, err), err
    assert re.search(r"warning: 1 LoRA modules have no weight in source\.safetensors: 'lora_unet_blocks_9_attn_to_q'", err), err
    # Under similarity pairing: no hint; the groups still add up.
    out_sim = runs["similarity"][0]
    total, groups = group_lines(out_sim)
    assert total == sum(groups.values()) == 10 and "may place" not in out_sim
    assert groups["below threshold (Φ < 0.8)"] == 2
    # No note where it does not apply: a LoRA without text-encoder modules never mentions them.
    plain = renumbered_lora(tmp_path / "loras" / "plain.safetensors", text_encoder=False)
    rc, out, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", plain, *EXACT], capsys)
    assert rc == 0 and "text-encoder" not in out + err and sum(group_lines(out)[1].values()) == 9


def test_similarity_candidates_stay_in_one_model_part_and_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prolora_core.candidates import candidate_class, model_part, weight_kind

    assert model_part("model.diffusion_model.input_blocks.4.1.proj_in.weight") == "diffusion model"
    assert model_part("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") == "text encoder 1"
    assert model_part("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == "text encoder"
    assert model_part("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == "text encoder clip_g"
    assert model_part("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight") == "text encoder clip_l"
    assert weight_kind("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight") == "attention"
    assert weight_kind("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.weight") == "feed-forward"
    assert weight_kind("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == "feed-forward"
    assert weight_kind("model.diffusion_model.input_blocks.1.0.in_layers.2.weight") == "in_layers"
    assert candidate_class("a.attn1.to_q.weight", (24, 40)) != candidate_class("a.ff.net.2.weight", (24, 40))

    # The source's UNet query weight has look-alikes of its shape in the target's text encoder and
    # feed-forward; the target's own UNet query weight is unrelated. Similarity pairing must not
    # cross model parts or kinds: the module stays below threshold, its candidate the UNet query weight.
    rng = np.random.default_rng(11)
    w = decaying_weight(rng, (24, 40))
    near = lambda: (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32)
    src = write_base(tmp_path / "src.safetensors", {"blocks.0.attn.to_q": w}, prefix="model.diffusion_model.")
    tensors = {"model.diffusion_model.blocks.0.attn.to_q.weight": torch.from_numpy(decaying_weight(rng, (24, 40))),
               "model.diffusion_model.blocks.0.ff.net.2.weight": torch.from_numpy(near()),
               "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.from_numpy(near())}
    save_file(tensors, str(tmp_path / "tgt.safetensors"))
    lora = write_lora(tmp_path / "lora.safetensors", make_updates(seed=2, modules={"blocks.0.attn.to_q": (24, 40)}), "underscore")
    report = tmp_path / "r.json"
    rc, out, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", src, "--target-base", tmp_path / "tgt.safetensors", "--lora", lora, "--pairing", "similarity",
                             "--report", report, "--out", tmp_path / "o.safetensors", *EXACT], capsys)
    assert rc == 1 and group_lines(out) == (1, {"below threshold (Φ < 0.8)": 1}), err + out  # nothing transferable
    (row,) = read_report(report)["modules"]
    assert row["reason"] == "below threshold" and row["candidate"] == "blocks.0.attn.to_q" and row["candidate_phi"] < 0.5


def test_cli_writes_next_to_the_input_named_after_the_target_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = renumbered_pair(tmp_path)
    lora = renumbered_lora(tmp_path / "loras" / "sdxl" / "ink.safetensors", text_encoder=False)
    argv = ["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", lora, *EXACT]
    first = tmp_path / "loras" / "sdxl" / "ink__to_pruned.safetensors"
    rc, _, err = run_main(argv, capsys)
    assert rc == 0 and first.is_file() and f"wrote {first}" in err, err
    before = first.read_bytes()
    rc, _, err = run_main(argv, capsys)
    second = first.with_name("ink__to_pruned_2.safetensors")
    assert rc == 0 and second.is_file() and first.read_bytes() == before == second.read_bytes(), "a rerun gets a numbered name"
    rc, _, err = run_main([*argv, "--name-pattern", "{lora}-{mode}-{source}"], capsys)
    assert rc == 0 and (lora.parent / "ink-prolora-full-source.safetensors").is_file(), err
    for bad, why in (("{nope}", "bad file name pattern"), ("../{lora}", "not a plain file name")):
        rc, _, err = run_main([*argv, "--name-pattern", bad], capsys)
        assert rc == 2 and why in err, err
    assert sorted(p.name for p in lora.parent.iterdir()) == ["ink-prolora-full-source.safetensors", "ink.safetensors",
                                                            "ink__to_pruned.safetensors", "ink__to_pruned_2.safetensors"]


def test_threads_default_and_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prolora_core.config import default_threads

    assert default_threads() == max(1, min(4, (os.cpu_count() or 2) // 2))
    source, target = renumbered_pair(tmp_path)
    lora = renumbered_lora(tmp_path / "ink.safetensors", text_encoder=False)
    for extra, want in (([], default_threads()), (["--threads", "2"], 2), (["--deterministic", "--threads", "3"], 1)):
        report = tmp_path / "r.json"
        rc, _, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", lora, "--report", report,
                               "--out", tmp_path / "o.safetensors", *EXACT, *extra], capsys)
        assert rc == 0, err
        assert read_report(report)["summary"]["threads"] == want
    assert torch.get_num_threads() == int(os.environ.get("PROLORA_TEST_THREADS", "1")), "the thread count is restored after a run"
    rc, _, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", lora, "--threads", "0", *EXACT], capsys)
    assert rc == 2 and "--threads must be positive" in err


# --------------------------------------------------------------------------------------
# Inside the real ComfyUI host: Transfer LoRA (files), ProLoRA Cache, Match Modules
# --------------------------------------------------------------------------------------


@pytest.fixture()
def models(comfyui: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models/diffusion_models with the zoo's source and descendant B (pruned, two blocks
    renumbered), models/loras/zoo/ with the style LoRA trained on the source, and the basis cache,
    all under ``tmp_path`` for this test only."""
    import folder_paths

    for folder in ("diffusion_models", "loras"):
        (tmp_path / folder).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path / folder)], folder_paths.folder_names_and_paths[folder][1]))
    for name in ("source", "descendant_b"):
        shutil.copy(ZOO / f"{name}.safetensors", tmp_path / "diffusion_models")
    (tmp_path / "loras" / "zoo").mkdir()
    shutil.copy(ZOO / "lora_style_source.safetensors", tmp_path / "loras" / "zoo" / "style.safetensors")
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _files(nodes_by_id: dict[str, Any], pairing: str, **kw: Any) -> tuple[str, str]:
    args = {"source_model": "diffusion_models/source.safetensors", "target_model": "diffusion_models/descendant_b.safetensors",
            "lora_name": "zoo/style.safetensors", "more_loras": "", "mode": "prolora-full", "subspace_rank": 0, "threshold": 0.8,
            "pairing": pairing, "filename_pattern": "{lora}__to_{target}", "device": "cpu", **kw}
    names, text = nodes_by_id["ProLoRATransferLoRAFiles"].execute(**args).args
    return names, text


def _bases(cache: Path) -> int:
    return len(list((cache / "bases").rglob("*.safetensors")))


def test_files_node_sums_up_hints_and_writes_next_to_its_input(nodes_by_id: dict[str, Any], models: Path) -> None:
    from prolora_core.lora import read_lora

    n_modules = len(read_lora(models / "loras" / "zoo" / "style.safetensors").modules)
    names, text = _files(nodes_by_id, "name", cache_max_gb=4.0)
    total, groups = group_lines(text)
    assert total == n_modules == sum(groups.values()), text
    assert groups["below threshold (Φ < 0.8)"] == 10 and groups["target has no such module (e.g. a removed block)"] == 24, text
    may = int(re.search(r"similarity pairing may place (\d+) of these 34 \(pairing = similarity\)", text).group(1))  # type: ignore[union-attr]
    assert "text-encoder" not in text and re.search(r"transferred \(norm ratio \d\.\d\d\)", text), text
    assert names == "zoo/style__to_descendant_b.safetensors" and (models / "loras" / "zoo" / "style__to_descendant_b.safetensors").is_file()
    assert f"saved as {names}" in text and re.search(r"basis cache: \d+\.\d MB in \d+ bases \(limit 4 GB\)", text), text
    assert _bases(models / "cache") > 0

    names2, text2 = _files(nodes_by_id, "similarity", cache_max_gb=0.0)
    _, groups2 = group_lines(text2)
    gained = next(n for label, n in groups2.items() if label.startswith("transferred")) - next(n for label, n in groups.items() if label.startswith("transferred"))
    assert gained == may == 20, (text, text2)  # the hint is what similarity pairing then placed: both renumbered blocks
    assert names2 == "zoo/style__to_descendant_b_2.safetensors", "never over an existing output"
    assert _bases(models / "cache") == 0 and "in 0 bases (limit 0 GB)" in text2, text2


def test_cache_node_shows_limits_and_clears_the_cache(nodes_by_id: dict[str, Any], models: Path) -> None:
    cache_node = nodes_by_id["ProLoRACache"]
    _files(nodes_by_id, "name")
    n = _bases(models / "cache")
    (info,) = cache_node.execute(action="show", max_gb=4.0).args
    assert n > 0 and f"in {n} bases at {models / 'cache'}" in info, info
    entries = sorted((models / "cache" / "bases").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    keep = entries[-1].stat().st_size
    for i, p in enumerate(entries):
        os.utime(p, ns=(10**9 + i, 10**9 + i))  # oldest first, the last one most recently used
    (info,) = cache_node.execute(action="apply limit", max_gb=(keep + 1) / 2**30).args
    assert _bases(models / "cache") == 1 and entries[-1].is_file() and f"removed the {n - 1} least recently used bases" in info, info
    (info,) = cache_node.execute(action="clear", max_gb=4.0).args
    assert _bases(models / "cache") == 0 and not (models / "cache" / "files").exists() and "in 0 bases" in info and "cleared" in info


def test_match_modules_summary_adds_up_and_hints_on_the_pruned_model(nodes_by_id: dict[str, Any], comfyui: Any) -> None:
    def run(node_id: str, **kw: Any) -> tuple:
        return tuple(nodes_by_id[node_id].execute(**kw).args)

    src, tgt, lora, _ = run("ProLoRADemoModels", target="descendant B, pruned + distilled", lora="style")
    (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    node = nodes_by_id["ProLoRAMatchModules"]
    out = node.execute(source_basis=bs, target_basis=bt, lora=lora, threshold=0.8, pairing="name")
    _, summary = out.args
    total, groups = group_lines(summary)
    assert total == len(lora_modules(lora)) == sum(groups.values()), summary
    assert groups["pass (would be transferred)"] == 50 and groups["below threshold (Φ < 0.8)"] == 10, summary
    assert "similarity pairing may place 20 of these 34 (pairing = similarity)" in summary, summary
    panel = out.ui["prolora_match"][0]
    assert sum(panel["groups"].values()) == panel["lora_modules"] == total and panel["similarity_may_place"] == 20
    _, summary = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.8, pairing="similarity")
    total, groups = group_lines(summary)
    assert groups["pass (would be transferred) (20 re-paired by similarity)"] == 70 and sum(groups.values()) == total, summary


def lora_modules(lora: dict) -> set[str]:
    return {k.split(".")[0] for k in lora if "." in k}
