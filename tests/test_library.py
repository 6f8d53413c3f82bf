"""Libraries of LoRAs in one run, on real safetensors files: ``--lora-dir`` (sorted, combinable
with ``--lora``, a bad LoRA left out with its error), outputs byte-identical to one run per LoRA
whether the LoRAs go through in one group or one group each (:func:`file_transfer.transfer_files`'s
``group_bytes``), every basis read from the disk cache once per run, and progress reported while
LoRAs are read, projected and written (callbacks counted by phase; no timing).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fixtures_files import MODULES, make_bases, make_updates, run_main, write_lora
from prolora_core.basis import BasisSettings
from prolora_core.cache import BasisCache
from prolora_core.config import TransferConfig
from prolora_core.file_transfer import lora_groups, transfer_files

COMMON = ["--device", "cpu", "--key-map", "names"]


def library(folder: Path, n: int, first_seed: int = 10) -> list[Path]:
    """``n`` LoRAs named so that their sorted order differs from the order they are written in."""
    return [write_lora(folder / f"style_{n - i:02d}.safetensors", make_updates(seed=first_seed + i), "kohya" if i % 2 else "underscore")
            for i in range(n)]


def test_lora_dir_runs_every_lora_sorted_leaves_a_bad_one_out_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    lib = tmp_path / "lib"
    loras = library(lib, 3)
    bad = lib / "style_00_broken.safetensors"
    bad.write_bytes(loras[0].read_bytes()[:100])  # truncated
    extra = write_lora(tmp_path / "in" / "extra.safetensors", make_updates(seed=99))
    cache = tmp_path / "cache"
    alone = tmp_path / "alone"
    alone.mkdir()
    for lora in [*loras, extra]:
        rc, _, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out-dir", alone,
                               "--cache-dir", cache, *COMMON], capsys)
        assert rc == 0, err

    out = tmp_path / "out"
    out.mkdir()
    rc, stdout, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", extra, "--lora-dir", lib,
                                "--out-dir", out, "--cache-dir", cache, *COMMON], capsys)
    assert rc == 2, err  # one LoRA left out: the others are written, the exit code says so
    assert f"left out: {bad}: not a safetensors file" in err, err
    names = sorted(p.name for p in [*loras, extra])
    assert sorted(p.name for p in out.iterdir()) == sorted(n.replace(".safetensors", "__to_target.safetensors") for n in names)
    for p in out.iterdir():
        assert p.read_bytes() == (alone / p.name).read_bytes(), p.name
    # one summary per LoRA, --lora first, then the folder in sorted order; then the count
    order = [line.split(":")[0] for line in stdout.splitlines() if line.startswith(("extra", "style_"))]
    assert order == ["extra.safetensors", "style_01.safetensors", "style_02.safetensors", "style_03.safetensors"], stdout
    assert re.search(r"\n  4 transferred[^\n]*\n4 of 5 outputs written \(5 LoRAs; 1 left out\)\nbasis cache:", stdout), stdout

    rc, _, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora-dir", extra, "--out-dir", out,
                           "--no-cache", *COMMON], capsys)
    assert rc == 2 and "--lora-dir needs a folder" in err and str(extra) in err, err
    rc, _, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--out-dir", out, "--no-cache", *COMMON],
                          capsys)
    assert rc == 2 and "no LoRA given" in err, err


def test_groups_give_the_same_files_and_read_each_basis_from_disk_once(tmp_path: Path) -> None:
    bases = make_bases(tmp_path / "in")
    loras = library(tmp_path / "lib", 3)
    config = TransferConfig(device="cpu", cpu_threads=1)
    root = tmp_path / "cache"
    warm = BasisCache(root, config.basis)
    transfer_files(bases.source, [bases.target], loras[:1], config, lambda li, ti: tmp_path / "warm.safetensors", cache=warm)
    assert warm.stats.misses > 0, "the first run computes and stores the bases"

    runs = {}
    for name, group_bytes in (("one", 1 << 30), ("each", 1)):
        (tmp_path / name).mkdir()
        cache = BasisCache(root, config.basis)
        run = transfer_files(bases.source, [bases.target], loras, config, lambda li, ti, d=tmp_path / name: d / loras[li].name,
                             cache=cache, group_bytes=group_bytes)
        runs[name] = (run, cache.stats.hits)
        assert run.targets[0].stats.svd_computed == 0 and cache.stats.misses == 0, "warm: every basis from the cache"
    assert len(lora_groups(loras, 1)) == 3 and len(lora_groups(loras, 1 << 30)) == 1
    assert runs["each"][1] == runs["one"][1] > 0, "three groups read each basis from disk once, as one group does"
    for lora in loras:
        assert (tmp_path / "each" / lora.name).read_bytes() == (tmp_path / "one" / lora.name).read_bytes(), lora.name
    for run, _ in runs.values():
        assert [p.name for p in run.written] == [p.name for p in loras]
        assert all(len(r.modules) == len(MODULES) for r in run.targets[0].results)
        assert all(t.device.type == "meta" for r in run.targets[0].results for t in r.tensors.values()), "written results hold no data"
        assert all(r.summary()["output_modules"] == len(MODULES) for r in run.targets[0].results)


def test_progress_is_reported_while_reading_projecting_and_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    loras = library(tmp_path / "lib", 3)
    calls: list[tuple[int, int, str]] = []
    config = TransferConfig(device="cpu", cpu_threads=1)
    (tmp_path / "out").mkdir()
    run = transfer_files(bases.source, [bases.target], loras, config, lambda li, ti: tmp_path / "out" / loras[li].name,
                         progress=lambda i, n, what: calls.append((i, n, what)), group_bytes=1)
    assert len(run.written) == 3

    def phase(prefix: str) -> list[tuple[int, int, str]]:
        return [c for c in calls if c[2].startswith(prefix)]

    reading, projecting, writing = phase("reading "), phase("projecting "), phase("writing ")
    assert [(i, n) for i, n, _ in reading] == [(0, 3), (1, 3), (2, 3)]
    assert [what for _, _, what in reading] == [f"reading {p.name}" for p in loras]
    # every module of every LoRA, counted within its group (one LoRA each here)
    assert len(projecting) == 3 * len(MODULES)
    assert {what.split(":")[0] for _, _, what in projecting} == {f"projecting {p.name}" for p in loras}
    assert all(n == len(MODULES) and 0 <= i < n for i, n, _ in projecting)
    assert [what for _, _, what in writing] == [f"writing {p.name}" for p in loras]
    assert len(calls) > len(reading) + len(projecting) + len(writing), "the bases report too"
    # the order of the phases within each group: read, bases, project, write
    kinds = ["r" if w.startswith("reading ") else "p" if w.startswith("projecting ") else "w" if w.startswith("writing ") else "b"
             for _, _, w in calls]
    per_group = "".join(kinds).split("r")[1:]
    assert len(per_group) == 3 and all(g.lstrip("b").lstrip("p").lstrip("w") == "" and "p" in g and g.endswith("w") for g in per_group), kinds

    # the CLI prints lines for these phases (a phase of 20 steps or more prints every 5 %)
    many = library(tmp_path / "many", 20, first_seed=200)
    out = tmp_path / "cli"
    out.mkdir()
    rc, _, err = run_main(["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora-dir", many[0].parent,
                           "--out-dir", out, "--no-cache", *COMMON], capsys)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[prolora] step ")]
    for what in ("reading style_", "projecting style_", "writing style_"):
        assert any(what in line for line in lines), (what, lines)
    assert any(f"20/20 (100%) writing {many[0].name}" in line for line in lines), lines
