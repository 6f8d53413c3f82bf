"""The command line end to end, on real safetensors files: every mode and input format against the
dense float64 reference (tests/reference.py), the report, thresholds, multi-LoRA runs, similarity
pairing, re-compression, dtypes, metadata, and the ``similarity`` / ``inspect`` / ``--help`` commands.

Most runs call ``prolora_core.cli.main`` in-process (fast); a representative few start
``python -m prolora_core`` as a real subprocess.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_files import (
    MODULES,
    Bases,
    decaying_weight,
    expected_dense,
    expected_phi,
    lora_name,
    make_bases,
    make_updates,
    read_metadata,
    read_output,
    read_report,
    rel_err,
    run_cli,
    run_main,
    write_base,
    write_lora,
)

MODES = ["prolora", "prolora-full", "subspace", "copy"]
K = 4
#: exact float64 bases and a fixed k: what the reference computes
EXACT = ["--basis-method", "exact", "--compute-dtype", "float64", "--subspace-rank", str(K)]
INPUT_FORMATS = ["kohya", "underscore", "native", "peft"]


def transfer_argv(bases: Bases, lora: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    return ["transfer", "--mode", "prolora-full", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out", out,
            "--no-cache", "--device", "cpu", *EXACT, *extra]


def modules_by_source(report: dict) -> dict[str, dict]:
    return {m["source"]: m for m in report["modules"]}


@pytest.mark.parametrize("fmt", INPUT_FORMATS, ids=INPUT_FORMATS)
@pytest.mark.parametrize("mode", MODES, ids=MODES)
def test_round_trip_matches_dense_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, fmt: str) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates(alpha=None if fmt == "peft" else 2.0)
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates, fmt)
    out, report_path = tmp_path / "out.safetensors", tmp_path / "report.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--mode", mode, "--report", report_path), capsys)
    assert rc == 0, err

    result = read_output(out)
    assert set(result) == {lora_name(m, fmt) for m in MODULES}, "output module names must be the input's"
    report = read_report(report_path)
    rows = modules_by_source(report)
    assert set(rows) == {lora_name(m, fmt) for m in MODULES}
    for module, u in updates.items():
        name = lora_name(module, fmt)
        got = result[name]
        want = expected_dense(u, bases.ws[module], bases.wt[module], K, mode)
        assert rel_err(got.dense(), want) <= 1e-6, f"{module} ({mode}, {fmt})"
        assert got.rank == (2 * u.rank if mode == "prolora" else u.rank)
        assert got.up.dtype == got.down.dtype == torch.float32
        assert got.up.ndim == got.down.ndim == u.down.ndim, "conv factors stay 4-D, linear 2-D"
        row = rows[name]
        assert row["transferred"] is True and row["target"] == module
        assert row["source_norm"] == pytest.approx(np.linalg.norm(u.dense()), rel=1e-6)
        assert row["transferred_norm"] == pytest.approx(np.linalg.norm(want), rel=1e-6)
        if mode == "copy":
            assert row["similarity_u"] is None and row["similarity_v"] is None
        else:
            phi_u, phi_v = expected_phi(bases.ws[module], bases.wt[module], K)
            assert row["similarity_u"] == pytest.approx(phi_u, abs=1e-9)
            assert row["similarity_v"] == pytest.approx(phi_v, abs=1e-9)
    summary = report["summary"]
    assert (summary["transferred"], summary["modules"], summary["mode"]) == (4, 4, mode)
    per_lora = summary["loras"][str(lora)]
    assert per_lora["output_modules"] == 4 and per_lora["below_threshold"] == 0


def test_round_trip_through_a_real_subprocess(tmp_path: Path) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates, "underscore")
    out, report_path = tmp_path / "out" / "lora_t.safetensors", tmp_path / "out" / "report.json"
    out.parent.mkdir()
    proc = run_cli(transfer_argv(bases, lora, out, "--report", report_path), cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote {out}" in proc.stderr
    result = read_output(out)
    for module, u in updates.items():
        want = expected_dense(u, bases.ws[module], bases.wt[module], K, "prolora-full")
        assert rel_err(result[lora_name(module, "underscore")].dense(), want) <= 1e-6
    report = read_report(report_path)
    for row in report["modules"]:
        assert {"source", "target", "similarity_u", "similarity_v", "transferred", "source_norm", "transferred_norm"} <= set(row)
    assert report["summary"]["transferred"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora_t.safetensors", "report.json"], "no temporary files left"


def test_copy_ignores_the_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in", unrelated=MODULES)
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out, report_path = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--mode", "copy", "--threshold", "1.0", "--report", report_path), capsys)
    assert rc == 0, err
    result = read_output(out)
    for module, u in updates.items():
        assert torch.equal(result[module].up, torch.from_numpy(u.up))
        assert torch.equal(result[module].down, torch.from_numpy(u.down))
        assert result[module].alpha == u.alpha
    assert read_report(report_path)["summary"]["transferred"] == 4


@pytest.mark.parametrize("threshold,skipped", [("0.8", {"blocks.0.ff.net"}), ("0", set())], ids=["default-0.8", "zero"])
def test_threshold_skips_unrelated_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str], threshold: str, skipped: set[str]) -> None:
    bases = make_bases(tmp_path / "in", unrelated=["blocks.0.ff.net"])
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out, report_path = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--threshold", threshold, "--report", report_path), capsys)
    assert rc == 0, err
    assert set(read_output(out)) == set(MODULES) - skipped
    rows = modules_by_source(read_report(report_path))
    assert set(rows) == set(MODULES), "skipped modules are still listed in the report"
    for module in skipped:
        row = rows[module]
        assert row["transferred"] is False and row["target"] is None and row["transferred_norm"] is None
        assert row["reason"] == "below threshold"
        assert min(row["similarity_u"], row["similarity_v"]) < 0.8
        assert module in err, "the warning names the skipped module"
    summary = read_report(report_path)["summary"]
    assert summary["transferred"] == 4 - len(skipped)
    assert summary["loras"][str(lora)]["below_threshold"] == len(skipped)


@pytest.mark.parametrize("base_prefix", ["", "model.diffusion_model."], ids=["bare-base", "ldm-prefixed-base"])
def test_input_formats_give_identical_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], base_prefix: str) -> None:
    bases = make_bases(tmp_path / "in", prefix=base_prefix)
    formats = ["kohya", "underscore", "native", "model-native", "unet", "peft"]
    outputs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for fmt in formats:
        # PEFT files carry no alpha (scale 1); kohya's alpha = rank is the same scale.
        updates = make_updates(alpha=None)
        if fmt != "peft":
            for u in updates.values():
                u.alpha = float(u.rank)
        lora = write_lora(tmp_path / "in" / f"{fmt}.safetensors", updates, fmt)
        out = tmp_path / f"{fmt}_out.safetensors"
        rc, _, err = run_main(transfer_argv(bases, lora, out), capsys)
        assert rc == 0, f"{fmt}: {err}"
        result = read_output(out)
        assert set(result) == {lora_name(m, fmt) for m in MODULES}
        outputs[fmt] = {m: (result[lora_name(m, fmt)].up, result[lora_name(m, fmt)].down, result[lora_name(m, fmt)].alpha) for m in MODULES}
    first = outputs["kohya"]
    for fmt in formats[1:]:
        for m in MODULES:
            up, down, alpha = outputs[fmt][m]
            assert torch.equal(up, first[m][0]) and torch.equal(down, first[m][1]) and alpha == first[m][2], f"{fmt} differs on {m}"


def test_several_loras_match_separate_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    folder = tmp_path / "loras"
    a = write_lora(folder / "a.safetensors", make_updates(seed=3))
    b = write_lora(folder / "b.safetensors", make_updates(seed=4, alpha=None), "peft", metadata={"ss_output_name": "b"})
    separate = {}
    for lora in (a, b):
        separate[lora.stem] = tmp_path / f"{lora.stem}_alone.safetensors"
        rc, _, err = run_main(transfer_argv(bases, lora, separate[lora.stem]), capsys)
        assert rc == 0, err

    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    common = ["transfer", "--mode", "prolora-full", "--source-base", bases.source, "--target-base", bases.target, "--no-cache", *EXACT]
    proc = run_cli([*common, "--lora", a, "--lora", b, "--out-dir", d1])
    assert proc.returncode == 0, proc.stderr
    rc, _, err = run_main([*common, "--lora", folder, "--out-dir", d2], capsys)
    assert rc == 0, err
    for d in (d1, d2):
        assert sorted(p.name for p in d.iterdir()) == ["a__to_target.safetensors", "b__to_target.safetensors"]
        for stem in ("a", "b"):
            assert (d / f"{stem}__to_target.safetensors").read_bytes() == separate[stem].read_bytes(), f"{d.name}/{stem}"

    # a LoRA named twice (its folder and itself, or one path twice) is transferred once, with a warning
    d3 = tmp_path / "d3"
    d3.mkdir()
    rc, _, err = run_main([*common, "--lora", folder, "--lora", b, "--lora", tmp_path / "loras" / ".." / "loras" / "a.safetensors",
                           "--out-dir", d3], capsys)
    assert rc == 0, err
    assert "2 LoRA file(s) named twice" in err, err
    assert sorted(p.name for p in d3.iterdir()) == ["a__to_target.safetensors", "b__to_target.safetensors"]
    for stem in ("a", "b"):
        assert (d3 / f"{stem}__to_target.safetensors").read_bytes() == separate[stem].read_bytes(), stem


RENUMBERED = {f"blocks.{i}.attn.to_q": (24, 40) for i in range(3)}


@pytest.mark.parametrize("fmt", ["kohya", "underscore"], ids=["kohya", "underscore"])
def test_similarity_pairing_repairs_renumbered_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    # Target = source with blocks.1 removed and blocks.2 renumbered to blocks.1.
    rng = np.random.default_rng(7)
    ws = {name: decaying_weight(rng, shape) for name, shape in RENUMBERED.items()}
    wt = {
        "blocks.0.attn.to_q": (ws["blocks.0.attn.to_q"] + 0.01 * rng.standard_normal((24, 40))).astype(np.float32),
        "blocks.1.attn.to_q": (ws["blocks.2.attn.to_q"] + 0.01 * rng.standard_normal((24, 40))).astype(np.float32),
    }
    bases = Bases(write_base(tmp_path / "src.safetensors", ws), write_base(tmp_path / "tgt.safetensors", wt), ws, wt)
    updates = make_updates(seed=5, modules=RENUMBERED)
    lora = write_lora(tmp_path / "lora.safetensors", updates, fmt)

    out, report_path = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--pairing", "similarity", "--report", report_path), capsys)
    assert rc == 0, err
    rows = modules_by_source(read_report(report_path))
    moved = rows[lora_name("blocks.2.attn.to_q", fmt)]
    assert moved["transferred"] and moved["repaired"] and moved["target"] == "blocks.1.attn.to_q"
    kept = rows[lora_name("blocks.0.attn.to_q", fmt)]
    assert kept["transferred"] and not kept["repaired"] and kept["target"] == "blocks.0.attn.to_q"
    gone = rows[lora_name("blocks.1.attn.to_q", fmt)]
    assert not gone["transferred"] and gone["reason"] == "below threshold"
    assert read_report(report_path)["summary"]["loras"][str(lora)]["repaired"] == 1

    result = read_output(out)
    assert set(result) == {lora_name("blocks.0.attn.to_q", fmt), lora_name("blocks.1.attn.to_q", fmt)}, "outputs are named after the target"
    want = expected_dense(updates["blocks.2.attn.to_q"], ws["blocks.2.attn.to_q"], wt["blocks.1.attn.to_q"], K, "prolora-full")
    assert rel_err(result[lora_name("blocks.1.attn.to_q", fmt)].dense(), want) <= 1e-6

    # Pairing by name cannot follow the renumbering: blocks.2 has no target, blocks.1 meets another weight.
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--report", report_path), capsys)
    assert rc == 0, err
    rows = modules_by_source(read_report(report_path))
    assert rows[lora_name("blocks.2.attn.to_q", fmt)]["reason"] == "target has no weight of that name"
    assert rows[lora_name("blocks.1.attn.to_q", fmt)]["reason"] == "below threshold"
    assert set(read_output(out)) == {lora_name("blocks.0.attn.to_q", fmt)}


def test_out_rank_recompresses_and_reports_energy_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out, report_path = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--mode", "prolora", "--out-rank", "2", "--report", report_path), capsys)
    assert rc == 0, err
    result = read_output(out)
    dropped = total = 0.0
    for module, u in updates.items():
        full = expected_dense(u, bases.ws[module], bases.wt[module], K, "prolora")
        U, S, Vt = np.linalg.svd(full, full_matrices=False)
        best2 = (U[:, :2] * S[:2]) @ Vt[:2]
        assert result[module].rank == 2
        assert rel_err(result[module].dense(), best2) <= 1e-5, module
        dropped += float(np.sum(S[2:] ** 2))
        total += float(np.sum(S**2))
    reported = read_report(report_path)["summary"]["loras"][str(lora)]["energy_dropped"]
    assert 0 < reported < 1
    assert reported == pytest.approx(dropped / total, rel=1e-5)
    assert read_metadata(out)["prolora.out_rank"] == "2"


def test_fp16_lora_gives_fp16_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates(dtype=np.float16)
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out = tmp_path / "out.safetensors"
    rc, _, err = run_main(transfer_argv(bases, lora, out), capsys)
    assert rc == 0, err
    result = read_output(out)
    for module, u in updates.items():
        assert result[module].up.dtype == result[module].down.dtype == torch.float16
        want = expected_dense(u, bases.ws[module], bases.wt[module], K, "prolora-full")
        assert rel_err(result[module].dense(), want) <= 3e-3, module


def test_metadata_kept_and_provenance_added_without_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    tags = json.dumps({"10_cat": {"cat": 12, "sitting": 3}})
    meta = {"ss_tag_frequency": tags, "modelspec.title": "Cat style ✓ 猫", "ss_output_name": "cat", "ss_sd_model_name": "source.safetensors"}
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates(), metadata=meta)
    outs = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    for out in outs:
        rc, _, err = run_main(transfer_argv(bases, lora.resolve(), out.resolve(), "--mode", "subspace"), capsys)
        assert rc == 0, err
    got = read_metadata(outs[0])
    assert got["ss_tag_frequency"] == tags and got["ss_output_name"] == "cat"
    assert got["modelspec.title"].startswith("Cat style ✓ 猫")
    assert got["prolora.source_base"] == "source.safetensors" and got["prolora.target_base"] == "target.safetensors"
    assert got["prolora.mode"] == "subspace" and got["prolora.subspace_rank"] == str(K)
    assert got["prolora.modules_transferred"] == "4" and "prolora.version" in got
    for key, value in got.items():
        assert str(tmp_path) not in value and not value.startswith("/"), f"absolute path in metadata {key}={value!r}"
    assert outs[0].read_bytes() == outs[1].read_bytes(), "same inputs must give the same file (no timestamps)"


def test_similarity_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in", unrelated=["blocks.1.conv"])
    missing = "blocks.1.skip"
    write_base(bases.target, {m: w for m, w in bases.wt.items() if m != missing})
    proc = run_cli(["similarity", "--source-base", bases.source, "--target-base", bases.target, "--json", "--no-cache", *EXACT])
    assert proc.returncode == 0, proc.stderr
    rows = {r["module"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == set(MODULES), "one row per matrix weight of the source (1-D weights left out)"
    assert rows[missing]["similarity_u"] is None and rows[missing]["note"] == "not in target"
    for module in set(MODULES) - {missing}:
        phi_u, phi_v = expected_phi(bases.ws[module], bases.wt[module], K)
        assert rows[module]["similarity_u"] == pytest.approx(phi_u, abs=1e-9)
        assert rows[module]["similarity_v"] == pytest.approx(phi_v, abs=1e-9)
        assert rows[module]["k"] == K
    assert rows["blocks.1.conv"]["similarity_u"] < 0.8 < rows["blocks.0.attn.to_q"]["similarity_u"]
    assert rows["blocks.1.conv"]["shape"] == [12, 54]

    rc, out, err = run_main(["similarity", "--source-base", bases.source, "--target-base", bases.target, "--no-cache", *EXACT], capsys)
    assert rc == 0, err
    assert "Φ_U" in out and all(m in out for m in MODULES) and "not in target" in out


def test_inspect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora = write_lora(tmp_path / "lora.safetensors", make_updates(), "underscore", metadata={"ss_output_name": "x"})
    rc, out, err = run_main(["inspect", lora], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["modules"] == 4 and info["conv_modules"] == 2
    assert info["ranks"] == [2, 3] and info["alphas"] == [2.0]
    assert info["dtype"] == "float32" and info["unknown_keys"] == [] and info["metadata_keys"] == ["ss_output_name"]
    assert info["module_names"] == sorted(lora_name(m, "underscore") for m in MODULES)
    rc, out, err = run_main(["inspect", lora, "--limit", "1"], capsys)
    assert rc == 0 and len(json.loads(out)["module_names"]) == 1, err
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, naming the option
        run_main(["inspect", lora, "--limit", "-1"], capsys)
    assert exc.value.code == 2 and "--limit: must be 0 or more" in capsys.readouterr().err


def test_help_mentions_the_scope() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for word in ("transfer", "similarity", "inspect", "cache", "safetensors", "<module>.weight", "diffusion_model.", "kohya", "ComfyUI"):
        assert word in text, word


def test_rescale_restores_the_source_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out, report_path = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--mode", "subspace", "--rescale", "--report", report_path), capsys)
    assert rc == 0, err
    rows = modules_by_source(read_report(report_path))
    result = read_output(out)
    for module, u in updates.items():
        want = expected_dense(u, bases.ws[module], bases.wt[module], K, "subspace")
        want *= np.linalg.norm(u.dense()) / np.linalg.norm(want)
        assert rel_err(result[module].dense(), want) <= 1e-6
        assert rows[module]["transferred_norm"] == pytest.approx(rows[module]["source_norm"], rel=1e-9)
    assert read_metadata(out)["prolora.rescale_to_source_norm"] == "true"


def test_outputs_get_the_usual_permissions_and_out_replacing_a_file_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    bases = make_bases(tmp_path / "in")
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates(), "underscore")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older file")
    mask = os.umask(0o022)
    try:
        rc, _, err = run_main(transfer_argv(bases, lora, out), capsys)
    finally:
        os.umask(mask)
    assert rc == 0, err
    assert f"{out} exists and will be replaced" in err
    assert out.stat().st_mode & 0o777 == 0o644, oct(out.stat().st_mode)  # not mkstemp's 0600: ComfyUI under another user reads it
    assert read_output(out), "the old bytes were replaced by a LoRA"


def test_key_map_comfyui_refuses_a_file_comfyui_does_not_recognise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")  # a few plain weights: no model ComfyUI's detection knows
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates(), "underscore")
    out = tmp_path / "out.safetensors"
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--key-map", "comfyui"), capsys)
    assert rc == 2 and "error:" in err and "--key-map comfyui" in err and str(bases.source) in err, err
    assert not out.exists()
    rc, _, err = run_main(transfer_argv(bases, lora, out, "--key-map", "names"), capsys)
    assert rc == 0 and out.exists(), err


def test_cache_clear_removes_only_cache_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    bases = make_bases(tmp_path / "in")
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates(), "underscore")
    argv = [a for a in transfer_argv(bases, lora, tmp_path / "out.safetensors", "--cache-dir", root) if a != "--no-cache"]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    assert list((root / "bases").rglob("*.safetensors")), "the run filled the cache"
    mine = [root / "bases" / "notes.txt", root / "files" / "keep.txt", root / "other.txt"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("not a cache file")
    entries = len(list((root / "bases").rglob("*.safetensors")))
    rc, stdout, err = run_main(["cache", "--cache-dir", root, "--max-gb", "1"], capsys)  # under the limit: nothing goes
    assert rc == 0 and "removed the 0 least recently used" in stdout and f"in {entries} bases" in stdout, err
    rc, _, err = run_main(["cache", "--cache-dir", root, "--max-gb", "-1"], capsys)
    assert rc == 2 and "--max-gb must not be negative" in err, err
    rc, stdout, err = run_main(["cache", "--cache-dir", root, "--max-gb", "0"], capsys)
    assert rc == 0 and f"removed the {entries} least recently used" in stdout, err
    assert not list((root / "bases").rglob("*.safetensors"))
    assert all(p.read_text() == "not a cache file" for p in mine), "the limit removes only cache entries"
    rc, _, err = run_main(argv, capsys)  # fill it again for --clear
    assert rc == 0, err
    rc, stdout, err = run_main(["cache", "--cache-dir", root, "--clear"], capsys)
    assert rc == 0 and "cache files" in stdout, err
    assert not list((root / "bases").rglob("*.safetensors")) and not list((root / "files").glob("*.json"))
    assert all(p.read_text() == "not a cache file" for p in mine), "files that are not the cache's own stay"
    for clear in (["--clear"], []):  # showing a file as an empty cache would hide the typo
        rc, _, err = run_main(["cache", "--cache-dir", bases.source, *clear], capsys)
        assert rc == 2 and "not a cache folder" in err and str(bases.source) in err, err


def test_one_bad_lora_among_several_is_left_out_and_the_others_are_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    good = write_lora(tmp_path / "in" / "good.safetensors", make_updates(), "underscore")
    bad = tmp_path / "in" / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) * 2 // 3])  # truncated
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["transfer", "--mode", "prolora-full", "--source-base", bases.source, "--target-base", bases.target, "--lora", good, "--lora", bad,
            "--out-dir", out_dir, "--no-cache", "--device", "cpu"]
    rc, _, err = run_main(argv, capsys)
    assert rc == 2, err
    assert f"left out: {bad}" in err and "truncated" in err, err
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == [f"good__to_{Path(bases.target).stem}.safetensors"], written
    assert read_output(out_dir / written[0]), "the good LoRA's output is a LoRA"
    rc, _, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", bases.source, "--target-base", bases.target, "--lora", bad,
                           "--out-dir", out_dir, "--no-cache", "--device", "cpu"], capsys)
    assert rc == 2 and "truncated" in err and "left out" not in err, err  # alone, a bad LoRA is the error it always was


def test_output_piped_into_a_reader_that_quits_is_no_traceback(tmp_path: Path) -> None:
    """``similarity --json | head -1``: the reader closes the pipe before the output is written; the
    command ends quietly with the shell's SIGPIPE status, not a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    from fixtures_files import REPO_ROOT

    bases = make_bases(tmp_path / "in")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv in (["similarity", "--source-base", bases.source, "--target-base", bases.target, "--json", "--no-cache", *EXACT],
                 ["inspect", write_lora(tmp_path / "lora.safetensors", make_updates(), "kohya")]):
        proc = subprocess.Popen([sys.executable, "-m", "prolora_core", *map(str, argv)], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader is gone before the first byte: every write meets a closed pipe
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141, (argv[0], err)
        assert "Traceback" not in err and "BrokenPipeError" not in err, (argv[0], err)
