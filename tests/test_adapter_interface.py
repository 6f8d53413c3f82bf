"""The adapter interface (``prolora_core.adapters.Adapter``) and its registry, format by format and
spelling by spelling, with ComfyUI 0.3.75's own loader as the judge:

* the registry lists the formats in the order ComfyUI's ``comfy.weight_adapter.adapters`` tries
  them (a ``.diff`` after the adapters, as ``load_lora`` reads it);
* each spelling is read whole by ComfyUI and by the pack, claimed by exactly one format, and the
  parsed update's ``dense()`` is the change ComfyUI's ``calculate_weight`` makes;
* ``copy`` writes each format back (as it came, or as its factors) so that ComfyUI applies the same;
* ``project`` at target = source (``prolora-full``) gives the update back, and at target ≠ source
  agrees with the dense float64 reference (tests/reference.py), written back in the format's own
  output form (LoRA factors, re-factored LoRA, or a ``.diff``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from prolora_core.adapter_types import ADAPTERS, FullDiff, LoHa, LoKr, LoraModule
from prolora_core.adapters import Adapter, Projected
from prolora_core.basis import BasisSettings, compute_basis
from prolora_core.lora import module_tensors, parse_state_dict
from reference import reference_transfer

M = "blocks.0.attn.to_q"  # a module name with no suffix of its own
LINEAR, CONV = (24, 40), (12, 6, 3, 3)
K = 4
EXACT = BasisSettings(method="exact", compute_dtype=torch.float64)
Tensor = torch.Tensor


def _t(rng: np.random.Generator, *shape: int) -> Tensor:
    return torch.from_numpy((0.3 * rng.standard_normal(shape)).astype(np.float32))


def _example(fmt: type[Adapter], label: str, suffixes: tuple[str, ...], seed: int) -> list[tuple[str, tuple[int, ...], dict[str, Tensor]]]:
    """Modules in ``label``'s spelling: ``(case id, weight shape, tensors)``, linear and conv where the format has both."""
    rng = np.random.default_rng(seed)
    alpha = {f"{M}.alpha": torch.tensor(3.0)}
    if fmt is LoraModule:
        up, down = suffixes
        out = [(label, LINEAR, {f"{M}{up}": _t(rng, 24, 5), f"{M}{down}": _t(rng, 5, 40), **alpha})]
        if up == ".lora_up.weight":  # LoCon conv and LoCon Tucker (lora_mid folded into down)
            out.append((f"{label} conv", CONV, {f"{M}{up}": _t(rng, 12, 3, 1, 1), f"{M}{down}": _t(rng, 3, 6, 3, 3), **alpha}))
            out.append((f"{label} tucker", CONV, {f"{M}{up}": _t(rng, 12, 3, 1, 1), f"{M}{down}": _t(rng, 3, 6, 1, 1),
                                                  f"{M}.lora_mid.weight": _t(rng, 3, 3, 3, 3), **alpha}))
        return out
    if fmt is LoHa:
        plain = {f"{M}.hada_w1_a": _t(rng, 24, 2), f"{M}.hada_w1_b": _t(rng, 2, 40), f"{M}.hada_w2_a": _t(rng, 24, 2),
                 f"{M}.hada_w2_b": _t(rng, 2, 40), **alpha}
        tucker = {f"{M}.hada_w1_a": _t(rng, 2, 12), f"{M}.hada_w1_b": _t(rng, 2, 6), f"{M}.hada_w2_a": _t(rng, 2, 12),
                  f"{M}.hada_w2_b": _t(rng, 2, 6), f"{M}.hada_t1": _t(rng, 2, 2, 3, 3), f"{M}.hada_t2": _t(rng, 2, 2, 3, 3), **alpha}
        return [(label, LINEAR, plain), (f"{label} tucker", CONV, tucker)]
    if fmt is LoKr:  # 24×40 = [4, 5] ⊗ [6, 8] (w2 factored, alpha / dim); [12, 6, 3, 3] = [3, 2] ⊗ [4, 3, 3, 3] (whole sides)
        return [(label, LINEAR, {f"{M}.lokr_w1": _t(rng, 4, 5), f"{M}.lokr_w2_a": _t(rng, 6, 2), f"{M}.lokr_w2_b": _t(rng, 2, 8), **alpha}),
                (f"{label} conv", CONV, {f"{M}.lokr_w1": _t(rng, 3, 2), f"{M}.lokr_w2": _t(rng, 4, 3, 3, 3)})]
    if fmt is FullDiff:
        return [(label, LINEAR, {f"{M}.diff": _t(rng, *LINEAR)}), (f"{label} conv", CONV, {f"{M}.diff": _t(rng, *CONV)})]
    raise AssertionError(f"a registered format without an example here: {fmt.__name__} (add one)")


CASES = [(fmt, label, *case) for i, fmt in enumerate(ADAPTERS) for j, (label, suffixes) in enumerate(fmt.SPELLINGS)
         for case in _example(fmt, label, suffixes, 10 * i + j)]
IDS = [c[2] for c in CASES]


def _weight(shape: tuple[int, ...], seed: int) -> Tensor:
    rng = np.random.default_rng(seed)
    m = shape[0]
    n = int(np.prod(shape[1:]))
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 0.7 ** np.arange(min(m, n))
    return torch.from_numpy((u[:, : len(s)] * s @ v[:, : len(s)].T).reshape(shape).astype(np.float32))


def comfy_change(tensors: dict[str, Tensor], base: Tensor, caplog: pytest.LogCaptureFixture) -> tuple[Any, np.ndarray]:
    """ComfyUI's patch for module ``M`` on ``base`` and the change it makes (float64); fails when
    ComfyUI leaves a key unread."""
    import comfy.lora

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, {M: f"{M}.weight"})
    missing = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not missing, missing
    patch = patches[f"{M}.weight"]
    after = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base.float().clone(), f"{M}.weight")
    return patch, (after.double() - base.double()).numpy()


def written(name: str, out: Projected, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A projected update as the engine writes it: LoRA factors in their layout, or a ``.diff``."""
    if out.diff is not None:
        return {f"{name}.diff": out.diff.to(dtype)}
    assert out.factors is not None
    return module_tensors(name, out.factors, out.layout, dtype)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_registry_is_in_comfyuis_order(comfyui: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Each format's first spelling becomes the ComfyUI adapter it stands for; the registry lists
    them in ``comfy.weight_adapter.adapters``' order, a ``.diff`` (not an adapter there) last."""
    import comfy.weight_adapter

    order = []
    for fmt in ADAPTERS:
        fmt_id, label, case, shape, tensors = next(c for c in CASES if c[0] is fmt)
        patch, _ = comfy_change(tensors, _weight(shape, 0), caplog)
        if isinstance(patch, tuple):
            assert patch[0] == "diff" and fmt.kind == "diff"
            order.append(len(comfy.weight_adapter.adapters))
        else:
            assert type(patch).name.lower() == fmt.kind, (fmt.__name__, type(patch).__name__)
            order.append(comfy.weight_adapter.adapters.index(type(patch)))
    assert order == sorted(order) and len(set(order)) == len(order)
    assert [f.kind for f in ADAPTERS] == ["lora", "loha", "lokr", "diff"]


@pytest.mark.parametrize("fmt,label,case,shape,tensors", CASES, ids=IDS)
def test_each_spelling_is_read_whole_and_its_dense_update_is_comfyuis(comfyui: Any, caplog: pytest.LogCaptureFixture, fmt: type[Adapter],
                                                                      label: str, case: str, shape: tuple[int, ...],
                                                                      tensors: dict[str, Tensor]) -> None:
    base = _weight(shape, 1)
    _, want = comfy_change(tensors, base, caplog)
    parts = {k[len(M):]: k for k in tensors}
    claimed = {lab: f for f in ADAPTERS for lab in f.claims(parts, tensors)}
    assert claimed == {label: fmt}, "exactly one format claims the spelling"
    lora = parse_state_dict(dict(tensors))
    assert lora.unused == {} and list(lora.modules) == [M]
    u = lora.modules[M].update
    assert type(u) is fmt and u.kind == fmt.kind
    assert u.fits(shape) and not u.fits((shape[1], shape[0], *shape[2:]))
    assert u.matrix_shape == (shape[0], int(np.prod(shape[1:])))
    assert u.is_conv == (len(shape) == 4 and case.endswith(("conv", "tucker")))
    got = u.dense().double().numpy()
    assert rel(got.reshape(want.shape), want) <= 1e-6
    assert u.norm() == pytest.approx(float(np.linalg.norm(want)), rel=1e-6)


@pytest.mark.parametrize("fmt,label,case,shape,tensors", CASES, ids=IDS)
def test_copy_writes_each_format_back_so_comfyui_applies_the_same(comfyui: Any, caplog: pytest.LogCaptureFixture, fmt: type[Adapter],
                                                                 label: str, case: str, shape: tuple[int, ...],
                                                                 tensors: dict[str, Tensor]) -> None:
    base = _weight(shape, 2)
    _, want = comfy_change(tensors, base, caplog)
    u = parse_state_dict(dict(tensors)).modules[M].update
    stored = u.copied()
    if stored is None:  # written as its factors, kohya-dotted, the scale kept
        out = written(M, u.project(None, None, "copy", None))
        up_suffix = dict(fmt.SPELLINGS)[label][0]
        assert out[f"{M}.lora_up.weight"].ndim == tensors[M + up_suffix].ndim, "conv factors stay 4-D, linear 2-D"
    else:  # as it came
        out = {M + s: t for s, t in stored.items()}
        if u.alpha is not None:
            out[f"{M}.alpha"] = torch.tensor(u.alpha)
        assert set(out) == set(tensors)
    _, got = comfy_change(out, base, caplog)
    assert rel(got, want) <= 1e-6


@pytest.mark.parametrize("fmt,label,case,shape,tensors", CASES, ids=IDS)
def test_projection_in_the_formats_output_form_matches_the_reference(comfyui: Any, caplog: pytest.LogCaptureFixture, fmt: type[Adapter],
                                                                     label: str, case: str, shape: tuple[int, ...],
                                                                     tensors: dict[str, Tensor]) -> None:
    ws = _weight(shape, 3)
    wt = ws + 0.05 * _weight(shape, 4)
    u = parse_state_dict(dict(tensors)).modules[M].update
    bs, bt = compute_basis(ws, K, EXACT), compute_basis(wt, K, EXACT)
    delta = u.dense().double().numpy()
    for target, w_target, mode in ((bs, ws, "prolora-full"), (bt, wt, "prolora"), (bt, wt, "prolora-full")):
        out = u.project(bs, target, mode, None)
        want = reference_transfer(delta, ws.double().numpy(), w_target.double().numpy(), K, mode)
        _, got = comfy_change(written(M, out), w_target, caplog)
        if fmt in (LoHa, LoKr):  # re-factored into a LoRA keeping ≥ 99.9 % of the energy, reported
            assert out.factors is not None and out.energy is not None and out.energy_kept is not None
            assert out.energy_kept >= 0.999 and out.energy[0] == pytest.approx(out.energy_kept * out.energy[1])
            tol = (1 - out.energy_kept) ** 0.5 + 1e-5
        else:
            assert out.energy is None and (out.diff is not None) == (fmt is FullDiff)
            tol = 1e-5
        assert rel(got.reshape(want.shape), want) <= tol, mode
        assert out.norm == pytest.approx(float(np.linalg.norm(got)), rel=1e-5)


@pytest.mark.parametrize("fmt,label,case,shape,tensors", CASES, ids=IDS)
def test_a_dense_update_is_written_back_in_the_formats_output_form(comfyui: Any, caplog: pytest.LogCaptureFixture, fmt: type[Adapter],
                                                                   label: str, case: str, shape: tuple[int, ...],
                                                                   tensors: dict[str, Tensor]) -> None:
    """``from_dense`` (what mode casa and the dense path use): a diff stays a ``.diff``; LoRA, LoHa
    and LoKr become LoRA factors of the asked rank (default: a LoRA's own rank, else the energy
    rule), in the input's own layout for a LoRA; what is written is the best approximation."""
    u = parse_state_dict(dict(tensors)).modules[M].update
    rng = np.random.default_rng(5)
    m, n = u.matrix_shape
    delta = u.dense().double().numpy() + 0.01 * rng.standard_normal((m, n))  # a full-rank change of the update
    total = float(np.square(delta).sum())
    out = u.from_dense(torch.from_numpy(delta), shape, u.default_rank, total)
    _, got = comfy_change(written(M, out), _weight(shape, 6), caplog)
    s = np.linalg.svd(delta, compute_uv=False)
    if fmt is FullDiff:
        assert out.diff is not None and out.factors is None and rel(got.reshape(m, n), delta) <= 1e-6
        assert out.norm == pytest.approx(total ** 0.5, rel=1e-12)
        return
    r = u.default_rank if u.default_rank is not None else out.factors.rank
    assert out.factors is not None and out.factors.rank == r == (u.rank if fmt is LoraModule else r)
    assert out.layout == (u.layout if fmt is LoraModule else tuple(shape))
    best = float(np.sqrt(np.square(s[r:]).sum()))  # Eckart–Young: the error of the best rank-r approximation
    assert np.linalg.norm(got.reshape(m, n) - delta) == pytest.approx(best, rel=1e-4, abs=1e-6 * total ** 0.5)  # float32 factors
    assert out.energy_kept == pytest.approx(1 - best**2 / total, rel=1e-6)
    if fmt is not LoraModule:
        assert out.energy_kept >= 0.999 or r == 64
