"""Mode ``auto`` (prolora_core/auto.py): ``casa`` or the update copied, chosen once per LoRA from the
median relative departure ``‖W_t − W_s‖ / ‖W_s‖`` of its modules. Each branch is checked through the
CLI on real safetensors files against the independent dense float64 references: the CASA reference
of tests/test_casa.py (then the best rank-r approximation) for the ``casa`` branch, the input's own
``ΔW`` for the ``copy`` branch; the departures against numpy norms."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures_files import lora_name, make_bases, make_updates, matrix, read_metadata, read_output, read_report, rel_err, run_main, write_lora
from test_casa import best_rank, reference_casa


def departures(bases) -> dict[str, float]:
    """Independent reference: ‖W_t − W_s‖_F / ‖W_s‖_F per module, numpy float64."""
    return {k: float(np.linalg.norm(matrix(bases.wt[k]) - matrix(bases.ws[k])) / np.linalg.norm(matrix(bases.ws[k]))) for k in bases.ws}


def run_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str], bases, updates, threshold: str = "0") -> tuple[dict, dict, dict[str, str]]:
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates, "underscore")
    out, report_path = tmp_path / "out.safetensors", tmp_path / "report.json"
    argv = ["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out", out, "--no-cache",
            "--device", "cpu", "--mode", "auto", "--threshold", threshold, "--report", report_path]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    report = read_report(report_path)
    return read_output(out), {r["source"]: r for r in report["modules"]}, read_metadata(out)


def test_relative_departure_and_choice_match_numpy() -> None:
    import torch

    from prolora_core.auto import AUTO_MAX_DEPARTURE, choose, relative_departure

    rng = np.random.default_rng(0)
    ws, wt = rng.standard_normal((12, 5, 3, 3)), rng.standard_normal((12, 5, 3, 3))
    want = np.linalg.norm(wt - ws) / np.linalg.norm(ws)
    assert relative_departure(torch.from_numpy(ws).float(), torch.from_numpy(wt).float()) == pytest.approx(want, rel=1e-6)
    assert choose([0.05, 0.06, 0.9], 3) == ("casa", pytest.approx(0.06))  # the median decides, not the largest
    assert choose([0.05, 0.5, 0.9], 4)[0] == "copy"
    assert choose([AUTO_MAX_DEPARTURE], 2)[0] == "casa"  # half of the paired modules pass: related
    assert choose([0.05], 3)[0] == "none" and choose([], 0)[0] == "none"  # fewer than half pass: unrelated


def test_auto_small_departure_is_casa_on_every_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one module of the target is unrelated (a large departure): the LoRA's median still decides for it
    bases = make_bases(tmp_path / "in", noise=0.005, unrelated=("blocks.1.skip",))
    rel = departures(bases)
    assert rel["blocks.1.skip"] > 0.5 and np.median(list(rel.values())) < 0.13, rel
    updates = make_updates()
    result, rows, meta = run_auto(tmp_path, capsys, bases, updates)
    for module, u in updates.items():
        name = lora_name(module, "underscore")
        want, _ = reference_casa(u.dense(), matrix(bases.ws[module]), matrix(bases.wt[module]))
        low, kept = best_rank(want, u.rank)
        assert rel_err(result[name].dense(), low) <= 1e-5, module
        assert rows[name]["transferred"] and rows[name]["energy_kept"] == pytest.approx(kept, abs=1e-6)
        assert rows[name]["reason"].startswith("transferred (auto: casa; median departure"), rows[name]["reason"]
        assert f"this module's {rel[module]:.3f}" in rows[name]["reason"]
    assert rel_err(reference_casa(updates["blocks.1.skip"].dense(), matrix(bases.ws["blocks.1.skip"]),
                                  matrix(bases.wt["blocks.1.skip"]))[0], updates["blocks.1.skip"].dense()) > 0.05, "casa must change it"
    assert meta["prolora.mode"] == "auto" and meta["prolora.auto_max_departure"] == "0.13"
    assert meta["prolora.casa"] == "energy=0.9,tau=0.5,rho=0.5,arbitrate_q=0.85"


def test_auto_large_departure_copies_the_update_phi_or_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # three modules moved far (rel ≈ 0.2), one unrelated (below Φ at the default threshold): all copied as they came
    bases = make_bases(tmp_path / "in", noise=0.02, unrelated=("blocks.1.skip",))
    rel = departures(bases)
    assert np.median(list(rel.values())) > 0.13, rel
    updates = make_updates()
    result, rows, _ = run_auto(tmp_path, capsys, bases, updates, threshold="0.8")
    for module, u in updates.items():
        name = lora_name(module, "underscore")
        got = result[name]
        assert got.rank == u.rank and rel_err(got.dense(), u.dense()) <= 1e-6, module  # the input's ΔW, unchanged
        assert rows[name]["transferred"] and rows[name]["reason"].startswith("transferred (auto: copy; median departure"), rows[name]
        assert "> 0.13" in rows[name]["reason"]
    skip = rows[lora_name("blocks.1.skip", "underscore")]
    assert min(skip["similarity_u"], skip["similarity_v"]) < 0.8 and skip["reason"].endswith("this module below Φ)")


def test_auto_unrelated_target_transfers_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in", noise=0.005, unrelated=("blocks.1.skip", "blocks.1.conv", "blocks.0.ff.net"))
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates(), "underscore")
    out, report_path = tmp_path / "out.safetensors", tmp_path / "report.json"
    rc, _, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out", out,
                           "--no-cache", "--device", "cpu", "--mode", "auto", "--report", report_path], capsys)
    assert rc != 0 and "no module could be transferred" in err and not out.exists()
    report = read_report(report_path)
    assert report["summary"]["transferred"] == 0
    assert report["summary"]["loras"][str(lora)]["groups"]["below_threshold"] == 4, report["summary"]
    passing = [m for m in report["modules"] if min(m["similarity_u"], m["similarity_v"]) >= 0.8]
    assert len(passing) == 1  # the one related module passes Φ, but the LoRA's majority does not: nothing
    assert all(m["reason"] == "below threshold (auto: only 1/4 modules pass Φ, the target looks unrelated)" for m in report["modules"])


def test_auto_is_offered_by_both_transfer_nodes(nodes_by_id: dict[str, Any]) -> None:
    for node_id in ("ProLoRAProjectLoRA", "ProLoRATransferLoRAFiles"):
        mode_input = next(i for i in nodes_by_id[node_id].define_schema().inputs if i.id == "mode")
        assert "auto" in mode_input.options, node_id
