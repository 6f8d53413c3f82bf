"""Which target weights a source weight may be paired with, and the best candidate of a module
that was not transferred.

Similarity pairing (the paper's Φ used to *find* a module's counterpart in a pruned or renumbered
target) only compares weights of one candidate class: the same model part (the diffusion model,
or one text encoder), the same kind of weight (attention projection, feed-forward, or the layer
named by the last name component: ``in_layers``, ``proj_in``, ``skip_connection`` …) and the same
shape. A UNet module can so never land on a text-encoder weight, nor a query projection on a
convolution of the same shape.

:func:`suggest_candidates` names, for each module a transfer skipped, the most similar target
weight among the target bases already at hand and those of target weights whose name the source
lacks, and tells how many of them similarity pairing would place; its cost is a bounded number of
bases (:data:`HINT_SAMPLE`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .basis import Basis
from .linalg import matrix_shape
from .names import BaseIndex
from .report import SimilarityHint
from .similarity import Similarity, basis_similarity

if TYPE_CHECKING:  # match imports this module
    from .config import TransferConfig
    from .match import BasisProvider, ModuleMatch
    from .report import TransferResult
    from .weights import WeightSource

#: Model parts by key prefix, most specific first; a key with none of them is the diffusion model.
_PARTS: tuple[tuple[str, str], ...] = (
    (r"^(?:model\.)?diffusion_model\.", "diffusion model"),
    (r"^conditioner\.embedders\.(\d+)\.", r"text encoder \1"),
    (r"^text_encoders\.([^.]+)\.", r"text encoder \1"),
    (r"^(?:cond_stage_model|text_encoder|te)\.", "text encoder"),
    (r"^(?:text_encoder_2|te2)\.", "text encoder 2"),
    (r"^(clip_[lgh]|t5xxl|t5xl|t5base|umt5xxl|llama)\.", r"text encoder \1"),  # ComfyUI's CLIP state dict
    (r"^(?:first_stage_model|vae)\.", "vae"),
)
_ATTENTION = {"to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj", "qkv", "proj_attn", "query", "key", "value",
              "q", "k", "v", "o", "in_proj"}
_FEED_FORWARD = {"ff", "mlp", "fc1", "fc2", "feed_forward", "ffn"}
#: Source bases :func:`suggest_candidates` may compute for modules whose source basis is not at hand.
HINT_SAMPLE = 24


def model_part(key: str) -> str:
    """``model.diffusion_model.x.weight`` → ``diffusion model``; ``conditioner.embedders.1.…`` →
    ``text encoder 1``; ``text_encoders.clip_l.…`` → ``text encoder clip_l``."""
    for pattern, label in _PARTS:
        m = re.match(pattern, key)
        if m:
            return m.expand(label)
    return "diffusion model"


def weight_kind(key: str) -> str:
    """``attention``, ``feed-forward``, or the last non-numeric name component (``in_layers``)."""
    parts = [p for p in key.removesuffix(".weight").split(".") if not p.isdigit()]
    if not parts:
        return ""
    if any("attn" in p or "attention" in p for p in parts) or parts[-1] in _ATTENTION:
        return "attention"
    if any(p in _FEED_FORWARD for p in parts) or (len(parts) > 1 and parts[-2] == "net" and "ff" in parts):
        return "feed-forward"
    return parts[-1]


def candidate_class(key: str, shape: Sequence[int]) -> tuple:
    """What a weight may be paired with: (model part, kind, ndim, m, n)."""
    return (model_part(key), weight_kind(key), len(shape), *matrix_shape(tuple(shape)))


def target_candidates(target: WeightSource) -> dict[tuple, list[str]]:
    """Target matrix weights (2-D or 4-D, both sides > 1) by :func:`candidate_class`."""
    out: dict[tuple, list[str]] = {}
    for key in target.keys():
        shape = target.shape(key)
        if key.endswith(".weight") and len(shape) in (2, 4) and min(matrix_shape(shape)) > 1:
            out.setdefault(candidate_class(key, shape), []).append(key)
    return out


@dataclass
class Candidate:
    """The most similar target weight found for a source weight, and its Φ."""

    target_key: str
    similarity: Similarity


def best_candidates(matches: dict[str, ModuleMatch], skipped: Sequence[str], source: WeightSource, target: WeightSource,
                    provider: BasisProvider) -> dict[str, Candidate]:
    """For each source key in ``skipped``, the most similar target weight of its candidate class.

    Candidates: the target bases at hand in ``matches``, and the target weights whose name the
    source lacks (where a renumbered block lands), of a class some skipped module needs (at most
    ``4 * HINT_SAMPLE``, from the cache or computed). A missing source basis comes from the cache
    or is computed, for at most :data:`HINT_SAMPLE` keys (evenly spread)."""
    pool: dict[tuple, dict[str, Basis]] = {}
    for m in matches.values():
        if m.target_key is not None and m.target_basis is not None:
            pool.setdefault(candidate_class(m.target_key, target.shape(m.target_key)), {})[m.target_key] = m.target_basis
    wanted = {candidate_class(k, source.shape(k)): matches[k].k for k in dict.fromkeys(skipped)}  # class → subspace rank k
    source_names, target_index = BaseIndex(source.keys()), BaseIndex(target.keys())
    new_names = [key for cls, keys in target_candidates(target).items() if cls in wanted for key in keys
                 if source_names.find_bare(target_index.bare_name(key)) is None and key not in pool.get(cls, {})]
    for key in new_names[: 4 * HINT_SAMPLE]:
        cls = candidate_class(key, target.shape(key))
        pool.setdefault(cls, {})[key] = provider.get(target, key, wanted[cls])
    with_class = [k for k in dict.fromkeys(skipped) if candidate_class(k, source.shape(k)) in pool]
    missing = [k for k in with_class if matches[k].source_basis is None]
    step = max(1, -(-len(missing) // HINT_SAMPLE))
    sample = set(missing[::step])
    out: dict[str, Candidate] = {}
    for skey in with_class:
        m = matches[skey]
        sb = m.source_basis
        if sb is None:
            if skey not in sample:
                continue
            sb = provider.get(source, skey, m.k)
        best: Candidate | None = None
        for tkey, tb in pool[candidate_class(skey, source.shape(skey))].items():
            k = min(sb.k, tb.k)
            s = basis_similarity(sb.truncate(k), tb.truncate(k))
            if best is None or s.phi > best.similarity.phi:
                best = Candidate(tkey, s)
        if best is not None:
            out[skey] = best
    return out


def suggest_candidates(results: Sequence[TransferResult], matches: dict[str, ModuleMatch], source: WeightSource, target: WeightSource,
                       config: TransferConfig, provider: BasisProvider) -> None:
    """Fill each skipped module's ``candidate``/``candidate_phi`` (report) and, under name pairing,
    each result's :class:`SimilarityHint`. Modules without a base weight are left alone."""
    reports = [m for r in results for m in r.modules if not m.transferred and m.source_key is not None and m.source_key in matches]
    if config.mode == "copy" or not reports:
        return
    found: dict[str, Candidate] = {}
    if config.pairing == "name":
        keys = [m.source_key for m in reports if not matches[m.source_key].basis_free]  # type: ignore[index]
        found = best_candidates(matches, keys, source, target, provider)  # type: ignore[arg-type]
    index = BaseIndex([*target.keys()])
    for rep in reports:
        match = matches[rep.source_key]  # type: ignore[index]
        cand = found.get(rep.source_key)  # type: ignore[arg-type]
        if match.target_key is not None and match.similarity is not None and (cand is None or match.similarity.phi >= cand.similarity.phi):
            cand = Candidate(match.target_key, match.similarity)
        if cand is not None:
            rep.candidate, rep.candidate_phi = index.bare_name(cand.target_key), cand.similarity.phi
    if config.pairing != "name":
        return
    classes = set(target_candidates(target))
    for result in results:
        skipped = [m for m in result.modules if m.source_key in matches and not matches[m.source_key].basis_free  # type: ignore[index]
                   and m.group in ("below_threshold", "no_such_module")]
        looked = [m for m in skipped if m.source_key in found]
        placed = [m for m in looked if found[m.source_key].similarity.passes(config.threshold)  # type: ignore[index]
                  and found[m.source_key].target_key != matches[m.source_key].name_key]  # type: ignore[index]
        # A module whose candidate class has no target weight at all is judged as not placed.
        judged = len(looked) + sum(candidate_class(m.source_key, source.shape(m.source_key)) not in classes for m in skipped)  # type: ignore[arg-type]
        result.similarity_hint = SimilarityHint(len(placed), judged, len(skipped))
