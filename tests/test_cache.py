"""The on-disk basis cache through the CLI: hits across LoRAs, serving a smaller k, corruption,
settings that must not share entries, changed weights, and ``cache --clear``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_files import (
    MODULES,
    Bases,
    expected_dense,
    files_under,
    make_bases,
    make_updates,
    read_output,
    read_report,
    rel_err,
    run_cli,
    run_main,
    write_base,
    write_lora,
)

N_BASES = 2 * len(MODULES)  # one basis per module on each side


class Runner:
    """Transfers on one base pair with a cache folder, returning the report."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp, self.capsys = tmp, capsys
        self.bases: Bases = make_bases(tmp / "in")
        self.cache = tmp / "cache"
        self.loras = {seed: write_lora(tmp / "in" / f"lora{seed}.safetensors", make_updates(seed=seed)) for seed in (1, 2)}
        self.n = 0

    def run(self, seed: int, *extra: str, cache: bool = True) -> tuple[dict, Path]:
        self.n += 1
        out, report = self.tmp / f"out{self.n}.safetensors", self.tmp / f"report{self.n}.json"
        where = ["--cache-dir", str(self.cache)] if cache else ["--no-cache"]
        rc, _, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", self.bases.source, "--target-base", self.bases.target, "--lora", self.loras[seed],
                               "--out", out, "--report", report, *where, *extra], self.capsys)
        assert rc == 0, err
        assert "Traceback" not in err
        return read_report(report)["summary"], out

    def entries(self) -> list[Path]:
        return sorted((self.cache / "bases").rglob("*.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    ra, rb = read_output(a), read_output(b)
    return set(ra) == set(rb) and all(torch.equal(ra[k].up, rb[k].up) and torch.equal(ra[k].down, rb[k].down) and ra[k].alpha == rb[k].alpha for k in ra)


@pytest.fixture
def runner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Runner:
    return Runner(tmp_path, capsys)


def test_second_lora_on_the_same_bases_computes_no_svd(runner: Runner) -> None:
    first, _ = runner.run(1)
    assert first["svd_computed"] == N_BASES and first["bases_from_cache"] == 0
    assert len(runner.entries()) == N_BASES
    second, out = runner.run(2)
    assert second["svd_computed"] == 0 and second["bases_from_cache"] == N_BASES
    fresh, fresh_out = runner.run(2, cache=False)
    assert fresh["svd_computed"] == N_BASES
    assert same_tensors(out, fresh_out), "a cached basis must give exactly the uncached output"


def test_warm_cache_through_a_real_subprocess(runner: Runner) -> None:
    runner.run(1)
    out, report = runner.tmp / "sub.safetensors", runner.tmp / "sub.json"
    proc = run_cli(["transfer", "--mode", "prolora-full", "--source-base", runner.bases.source, "--target-base", runner.bases.target, "--lora", runner.loras[2],
                    "--out", out, "--report", report], cache_dir=runner.cache)  # the cache folder comes from $PROLORA_CACHE_DIR
    assert proc.returncode == 0, proc.stderr
    summary = read_report(report)["summary"]
    assert summary["svd_computed"] == 0 and summary["bases_from_cache"] == N_BASES


def test_smaller_subspace_rank_is_served_from_a_larger_entry(runner: Runner) -> None:
    exact = ("--basis-method", "exact", "--compute-dtype", "float64")
    runner.run(1, "--subspace-rank", "6", *exact)
    small, out = runner.run(2, "--subspace-rank", "3", *exact)
    assert small["svd_computed"] == 0 and small["bases_from_cache"] == N_BASES
    _, fresh = runner.run(2, "--subspace-rank", "3", *exact, cache=False)
    for name, got in read_output(out).items():
        assert rel_err(got.dense(), read_output(fresh)[name].dense()) <= 1e-6
    updates = make_updates(seed=2)
    for module, got in read_output(out).items():
        want = expected_dense(updates[module], runner.bases.ws[module], runner.bases.wt[module], 3, "prolora-full")
        assert rel_err(got.dense(), want) <= 1e-6
    larger, _ = runner.run(2, "--subspace-rank", "8", *exact)
    assert larger["svd_computed"] == N_BASES, "a larger k than cached must be computed"


def test_corrupt_and_truncated_entries_are_recomputed(runner: Runner) -> None:
    runner.run(1)
    entries = runner.entries()
    flipped, truncated = entries[0], entries[-1]
    data = bytearray(flipped.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])
    # Also damage the remembered content keys of the base files: unreadable, then the wrong JSON type.
    memos = sorted((runner.cache / "files").glob("*.json"))
    assert len(memos) == 2
    memos[0].write_text("{not json")
    memos[1].write_text('["a list, not a mapping"]')

    second, out = runner.run(2)
    assert second["svd_computed"] == 2 and second["bases_from_cache"] == N_BASES - 2
    _, fresh = runner.run(2, cache=False)
    assert same_tensors(out, fresh)
    third, _ = runner.run(1)
    assert third["svd_computed"] == 0, "the recomputed entries were written back"


@pytest.mark.parametrize(
    "changed",
    [("--seed", "1"), ("--basis-method", "randomized"), ("--basis-method", "exact"), ("--compute-dtype", "float64"),
     ("--cache-dtype", "float16"), ("--cache-dtype", "bfloat16")],
    ids=["seed", "randomized", "exact", "float64", "cache-float16", "cache-bfloat16"],
)
def test_other_basis_settings_use_another_cache_folder(runner: Runner, changed: tuple[str, str]) -> None:
    runner.run(1)
    before = {p.name for p in (runner.cache / "bases").iterdir()}
    summary, _ = runner.run(2, *changed)
    after = {p.name for p in (runner.cache / "bases").iterdir()}
    assert summary["svd_computed"] == N_BASES and summary["bases_from_cache"] == 0
    assert len(after - before) == 1 and before <= after


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["rewritten", "rewritten-mtime-restored"])
def test_changed_weights_are_not_served_stale(runner: Runner, keep_mtime: bool) -> None:
    runner.run(1)
    target = runner.bases.target
    st = target.stat()
    rng = np.random.default_rng(99)
    new_wt = {m: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32) for m, w in runner.bases.wt.items()}
    staged = write_base(runner.tmp / "staged.safetensors", new_wt)
    target.write_bytes(staged.read_bytes())  # in place, as `cp` does: same name, inode, size and header; new content
    assert target.stat().st_size == st.st_size and target.stat().st_ino == st.st_ino
    if keep_mtime:
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    summary, out = runner.run(2)
    assert summary["svd_computed"] == len(MODULES), "the target's bases must be recomputed, the source's served"
    _, fresh = runner.run(2, cache=False)
    assert same_tensors(out, fresh)
    updates = make_updates(seed=2)
    k_default = {m: max(1, min(64, min(w.shape[0], int(np.prod(w.shape[1:]))) // 4)) for m, w in new_wt.items()}
    for module, got in read_output(out).items():
        want = expected_dense(updates[module], runner.bases.ws[module], new_wt[module], k_default[module], "prolora-full")
        assert rel_err(got.dense(), want) <= 1e-4, module


def test_cache_clear_empties_the_folder(runner: Runner) -> None:
    runner.run(1)
    assert files_under(runner.cache)
    rc, out, err = run_main(["cache", "--cache-dir", runner.cache], runner.capsys)
    assert rc == 0 and "MiB" in out, err
    rc, out, err = run_main(["cache", "--cache-dir", runner.cache, "--clear"], runner.capsys)
    assert rc == 0 and "cleared" in out, err
    assert files_under(runner.cache) == {}
    again, _ = runner.run(1)
    assert again["svd_computed"] == N_BASES


def test_unwritable_cache_warns_once_and_still_transfers(runner: Runner, caplog: pytest.LogCaptureFixture) -> None:
    runner.cache.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="prolora"):
        summary, out = runner.run(1)
    assert summary["svd_computed"] == N_BASES
    assert len([r for r in caplog.records if "cannot write to the basis cache" in r.getMessage()]) == 1
    _, fresh = runner.run(1, cache=False)
    assert same_tensors(out, fresh)


def test_rank_one_bases_with_odd_strides_are_cached(tmp_path: Path) -> None:
    """A weight whose min dimension gives k = 1 yields an ``n × 1`` V with a non-unit stride; storing it must work."""
    from prolora_core import BasisCache, BasisSettings, compute_basis

    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    basis = compute_basis(w, 1, BasisSettings(method="exact"))
    cache = BasisCache(tmp_path, BasisSettings(method="exact"))
    cache.store("ab" * 16, basis)
    back = cache.load("ab" * 16, 1, (4, 40))
    assert back is not None and torch.equal(back.V, basis.V.contiguous())


@pytest.mark.parametrize("held", ["float16", "bfloat16"])
def test_half_precision_bases_are_stored_narrow_and_give_the_same_output_cold_warm_and_uncached(runner: Runner, held: str) -> None:
    """U and V are held in the cache dtype from the moment they are computed: the cache stores them
    narrow, and the cold, warm and uncached runs agree bit for bit; the rounding moves the update by
    about the dtype's precision, checked against the float64 reference."""
    from safetensors import safe_open

    exact = ("--basis-method", "exact", "--compute-dtype", "float32")
    cold, cold_out = runner.run(2, *exact, "--cache-dtype", held)
    entries = runner.entries()
    assert cold["svd_computed"] == N_BASES and len(entries) == N_BASES
    assert all(p.parent.parent.name.endswith(f"-c{held}") for p in entries)
    for p in entries:
        with safe_open(str(p), framework="pt") as f:
            assert f.get_tensor("U").dtype == f.get_tensor("V").dtype == getattr(torch, held)
            assert f.get_tensor("S").dtype == torch.float32
    warm, warm_out = runner.run(2, *exact, "--cache-dtype", held)
    assert warm["svd_computed"] == 0 and warm["bases_from_cache"] == N_BASES
    _, fresh_out = runner.run(2, *exact, "--cache-dtype", held, cache=False)
    assert same_tensors(cold_out, warm_out) and same_tensors(warm_out, fresh_out)
    _, wide_out = runner.run(2, *exact, cache=False)
    assert not same_tensors(warm_out, wide_out)  # it did round
    updates = make_updates(seed=2)
    bound = {"float16": 2e-3, "bfloat16": 2e-2}[held]  # a few units of the dtype's rounding (2^-11, 2^-8)
    for module, got in read_output(warm_out).items():
        want = expected_dense(updates[module], runner.bases.ws[module], runner.bases.wt[module],
                              max(1, min(64, min(runner.bases.ws[module].shape[0], int(np.prod(runner.bases.ws[module].shape[1:]))) // 4)), "prolora-full")
        assert rel_err(got.dense(), want) <= bound, module


def test_an_entry_of_another_dtype_is_not_served(tmp_path: Path) -> None:
    """An entry whose tensors are not in the dtype its settings hold (a stale or foreign file moved
    into the folder) is rebuilt, never widened and served."""
    from prolora_core import BasisCache, BasisSettings, compute_basis

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    half = BasisSettings(method="exact", cache_dtype=torch.float16)
    wide = BasisCache(tmp_path / "wide", BasisSettings(method="exact"))
    narrow = BasisCache(tmp_path / "narrow", half)
    assert wide.folder.name != narrow.folder.name
    wide.store("cd" * 16, compute_basis(w, 4, BasisSettings(method="exact")))
    moved = narrow.folder / "cd" / ("cd" * 16 + ".safetensors")
    moved.parent.mkdir(parents=True)
    moved.write_bytes((wide.folder / "cd" / ("cd" * 16 + ".safetensors")).read_bytes())
    assert narrow.load("cd" * 16, 4, (24, 40)) is None and narrow.stats.rebuilt == 1 and not moved.exists()
    basis = compute_basis(w, 4, half)
    narrow.store("cd" * 16, basis)
    back = narrow.load("cd" * 16, 4, (24, 40))
    assert back is not None and back.U.dtype == torch.float32 and torch.equal(back.U, basis.U) and torch.equal(back.V, basis.V)
