"""Mode ``casa``'s full source SVDs (prolora_core/full_bases.py): computed once per weight, served
from the basis cache (their own entry kind) and from memory within a byte budget. Through the CLI on
real safetensors files, in modes ``casa`` and ``auto``: cold, warm and uncached runs give bitwise the
same output, which also matches the independent dense float64 CASA reference (tests/test_casa.py),
and the report counts what was computed. The Project LoRA node in the real ComfyUI host
reads them from the cache too. The cache entries and the memory budget are checked on their own
with real weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_files import MODULES, lora_name, make_bases, make_updates, matrix, read_output, read_report, rel_err, run_main, write_lora
from test_cache import same_tensors
from test_casa import best_rank, case, reference_casa

N = len(MODULES)  # one source weight per module


def transfer(tmp: Path, capsys: pytest.CaptureFixture[str], bases, loras: list[Path], mode: str, tag: str, cache: Path | None,
             *extra: str) -> tuple[dict, dict[Path, Path], dict]:
    """One CLI run of ``loras`` → (report summary, output per LoRA, module rows by (LoRA, name))."""
    out_dir, report = tmp / f"out-{tag}", tmp / f"report-{tag}.json"
    out_dir.mkdir()
    where = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
    argv = ["transfer", "--source-base", bases.source, "--target-base", bases.target, "--out-dir", out_dir, "--device", "cpu",
            "--mode", mode, "--threshold", "0", "--report", report, *where, *extra]
    for lora in loras:
        argv += ["--lora", lora]
    rc, stdout, err = run_main(argv, capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    outs = sorted(out_dir.glob("*.safetensors"))
    assert len(outs) == len(loras), outs
    by_lora = {lora: next(o for o in outs if o.name.startswith(lora.stem)) for lora in loras}
    data = read_report(report)
    rows = {(Path(r["lora"]).name if "lora" in r else "", r["source"]): r for r in data["modules"]}
    return data["summary"], by_lora, {"rows": rows, "stdout": stdout, "err": err}


@pytest.mark.parametrize("mode", ["casa", "auto"])
def test_cold_warm_uncached_are_bitwise_equal_and_a_warm_run_computes_no_svd(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                            mode: str) -> None:
    bases = make_bases(tmp_path / "in", noise=0.005)
    updates = {seed: make_updates(seed=seed) for seed in (1, 2)}
    loras = [write_lora(tmp_path / "in" / f"lora{seed}.safetensors", u, "underscore") for seed, u in updates.items()]
    cache = tmp_path / "cache"

    cold, cold_out, info = transfer(tmp_path, capsys, bases, loras, mode, "cold", cache)
    # each source weight's SVD is computed once; the second LoRA is served from this run's memory
    assert (cold["full_svd_computed"], cold["full_bases_from_cache"]) == (N, N), cold
    assert f"full source SVDs computed {N}, from cache {N}" in info["err"] + info["stdout"]
    full = sorted((cache / "full").rglob("*.safetensors"))
    assert len(full) == N and len(sorted((cache / "bases").rglob("*.safetensors"))) == 2 * N, "full SVDs are their own entries"

    warm, warm_out, _ = transfer(tmp_path, capsys, bases, loras, mode, "warm", cache)
    assert (warm["full_svd_computed"], warm["full_bases_from_cache"]) == (0, 2 * N), warm
    assert warm["svd_computed"] == 0

    fresh, fresh_out, info = transfer(tmp_path, capsys, bases, loras, mode, "fresh", None)
    assert (fresh["full_svd_computed"], fresh["full_bases_from_cache"]) == (N, N), fresh

    for lora in loras:
        assert same_tensors(cold_out[lora], warm_out[lora]), f"{lora.name}: a cached full SVD must give exactly the computed one's output"
        assert same_tensors(cold_out[lora], fresh_out[lora]), lora.name
    for seed, lora in zip(updates, loras):  # and the output is CASA's (not only self-consistent)
        got = read_output(warm_out[lora])
        for module, u in updates[seed].items():
            want, _ = reference_casa(u.dense(), matrix(bases.ws[module]), matrix(bases.wt[module]))
            assert rel_err(got[lora_name(module, "underscore")].dense(), best_rank(want, u.rank)[0]) <= 1e-5, (lora.name, module)
    if mode == "auto":
        assert all(r["reason"].startswith("transferred (auto: casa") for r in info["rows"].values() if r["transferred"]), info["rows"]


def test_copy_and_projection_modes_need_no_full_svd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in")
    lora = write_lora(tmp_path / "in" / "lora.safetensors", make_updates())
    summary, _, _ = transfer(tmp_path, capsys, bases, [lora], "prolora-full", "p", tmp_path / "cache")
    assert (summary["full_svd_computed"], summary["full_bases_from_cache"]) == (0, 0)
    assert not (tmp_path / "cache" / "full").exists()


@pytest.mark.parametrize("shape", [(24, 24), (40, 24), (24, 40)], ids=["square", "tall", "wide"])
def test_casa_update_with_the_cached_svd_is_bitwise_the_same(tmp_path: Path, shape: tuple[int, int]) -> None:
    from prolora_core.basis import BasisSettings
    from prolora_core.cache import BasisCache
    from prolora_core.casa import casa_update, source_svd
    from prolora_core.errors import ProLoRAError
    from prolora_core.full_bases import full_key

    delta, ws, wt = (torch.from_numpy(a) for a in case(*shape))
    plain = casa_update(delta, ws, wt, 4, device="cpu")
    cache = BasisCache(tmp_path, BasisSettings())
    key = full_key(torch.float64, torch.device("cpu"))
    cache.store_full("ab" * 16, key, *source_svd(ws.double()))
    svd = cache.load_full("ab" * 16, key, shape)
    assert svd is not None
    given = casa_update(delta, ws, wt, 4, device="cpu", svd=svd)
    assert torch.equal(plain.delta, given.delta)
    assert torch.equal(plain.factors.up, given.factors.up) and torch.equal(plain.factors.down, given.factors.down)
    assert (plain.k, plain.groups, plain.arbitrated, plain.energy_kept) == (given.k, given.groups, given.arbitrated, given.energy_kept)
    with pytest.raises(ProLoRAError, match="precomputed source SVD"):
        casa_update(delta, ws, wt, 4, device="cpu", svd=tuple(t.float() for t in svd))  # type: ignore[arg-type]
    with pytest.raises(ProLoRAError, match="precomputed source SVD"):
        casa_update(delta, ws, wt, 4, device="cpu", svd=(svd[0][:, :-1], svd[1], svd[2]))


def test_full_entries_are_their_own_kind_checked_and_evicted_first(tmp_path: Path) -> None:
    from prolora_core.basis import BasisSettings, compute_basis
    from prolora_core.cache import BasisCache
    from prolora_core.casa import source_svd
    from prolora_core.full_bases import full_key

    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((30, 20)))
    cache = BasisCache(tmp_path, BasisSettings())
    ck, key = "cd" * 16, full_key(torch.float64, torch.device("cpu"))
    cache.store(ck, compute_basis(w.float(), 4))  # a top-k basis of the same weight
    cache.store_full(ck, key, *source_svd(w))
    U, S, V = cache.load_full(ck, key, (30, 20))  # type: ignore[misc]
    assert torch.allclose((U * S) @ V.T, w, atol=1e-12) and U.dtype == torch.float64
    assert cache.load(ck, 4, (30, 20)).k == 4 and cache.load(ck, 20, (30, 20)) is None, "a full entry is never served as a top-k basis"
    assert cache.load_full(ck, full_key(torch.float32, torch.device("cpu")), (30, 20)) is None, "another compute dtype is another entry"
    assert cache.load_full(ck, key, (20, 30)) is None and cache.load_full(ck, key, (30, 20)) is None, "a stale (reshaped) entry is removed"
    assert cache.stats.rebuilt == 1 and cache.full_entries() == 0
    cache.store_full(ck, key, *source_svd(w))
    path = next((tmp_path / "full").rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    assert cache.load_full(ck, key, (30, 20)) is None and not path.exists() and cache.stats.rebuilt == 2
    cache.store_full(ck, key, *source_svd(w))
    assert "1 bases and 1 full bases" in cache.describe()
    topk = next((tmp_path / "bases").rglob("*.safetensors")).stat().st_size
    assert cache.evict(topk) == 1 and cache.full_entries() == 0 and cache.entries() == 1, "the full SVD goes first, however recent"
    cache.store_full(ck, key, *source_svd(w))
    assert cache.clear() == 2 and not (tmp_path / "full").exists()


def test_memory_budget_keeps_the_first_svds_that_fit(tmp_path: Path) -> None:
    from prolora_core.full_bases import FullBases, svd_bytes
    from prolora_core.weights import open_weights

    bases = make_bases(tmp_path)
    src = open_weights(bases.source)
    keys = [f"{m}.weight" for m in MODULES]
    sizes = {k: svd_bytes(*matrix(bases.ws[m]).shape, torch.float64) for k, m in zip(keys, MODULES)}
    cpu = torch.device("cpu")
    one = FullBases()
    got = one.get(src, keys[0], cpu)
    assert sum(t.numel() * t.element_size() for t in got) == sizes[keys[0]] == one.held_bytes
    w = matrix(bases.ws[next(iter(MODULES))])
    assert np.allclose(((got[0] * got[1]) @ got[2].T).numpy(), w, atol=1e-6)
    for budget, held in ((0, []), (sizes[keys[0]] + sizes[keys[1]], keys[:2]), (sum(sizes.values()), keys)):
        full = FullBases(max_bytes=budget)
        for _ in range(3):  # three LoRAs touching the same weights in the same order
            for k in keys:
                full.get(src, k, cpu)
        assert full.held_bytes == sum(sizes[k] for k in held) <= budget
        assert full.stats.full_svd_computed == len(keys) + 2 * (len(keys) - len(held)), budget
        assert full.stats.full_bases_from_cache == 2 * len(held)
    with pytest.raises(ValueError, match="must not be negative"):
        FullBases(max_bytes=-1)


def test_disk_writes_stay_within_the_cache_limit(tmp_path: Path) -> None:
    from prolora_core.basis import BasisSettings
    from prolora_core.cache import BasisCache
    from prolora_core.full_bases import FullBases, svd_bytes
    from prolora_core.weights import open_weights

    bases = make_bases(tmp_path / "in")
    src = open_weights(bases.source)
    keys = [f"{m}.weight" for m in MODULES]
    first = svd_bytes(*matrix(bases.ws[next(iter(MODULES))]).shape, torch.float64)
    cache = BasisCache(tmp_path / "cache", BasisSettings())
    full = FullBases(cache, disk_max_bytes=first)
    for k in keys:
        full.get(src, k, torch.device("cpu"))
    assert cache.full_entries() == 1


def test_project_lora_node_reads_full_svds_from_the_cache(nodes_by_id: dict, comfyui: object, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy_host

    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    modules = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.2"]
    src = comfy_host.tiny_sd15_model(0)
    tgt = comfy_host.perturbed_copy(src, 0.05, 5)
    lora = comfy_host.kohya_lora(src, modules, rank=4, alpha=2.0, seed=1)
    run = lambda node_id, **kw: tuple(nodes_by_id[node_id].execute(**kw).args)  # noqa: E731

    def project(use_cache: bool) -> dict[str, torch.Tensor]:
        (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=use_cache)
        (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=use_cache)
        match, _ = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
        out, report = run("ProLoRAProjectLoRA", lora=lora, match=match, mode="casa", out_rank=0, rescale_to_source_norm=False)
        assert f"{len(modules)}/{len(modules)} modules transferred" in report
        return {k: v.clone() for k, v in out.items()}

    cold = project(True)
    full = sorted((tmp_path / "cache" / "full").rglob("*.safetensors"))
    assert len(full) == len(modules)
    inodes = [p.stat().st_ino for p in full]
    warm = project(True)
    # served, not recomputed: a computed SVD is stored again (temp file renamed over the entry: a new inode)
    assert [p.stat().st_ino for p in full] == inodes
    fresh = project(False)
    assert set(cold) == set(warm) == set(fresh) and all(torch.equal(cold[k], warm[k]) and torch.equal(cold[k], fresh[k]) for k in cold)
