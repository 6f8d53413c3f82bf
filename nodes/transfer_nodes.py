"""The three ProLoRA steps as V3 nodes: Compute Basis → Match Modules → Project LoRA."""
from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..prolora_core.errors import ProLoRAError
from ..prolora_core.modulation import modulation_line
from ..prolora_core.projection import MODES
from ..prolora_core.report import TransferResult, format_summary
from ..prolora_core.transfer import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, TransferConfig, overall_norm_ratio
from .bridge import UNET, build_handle
from .matching import MatchHandle, all_weight_keys, parse_lora_model, project_lora_model, unused_lines
from .families import check_shapes_can_match

CATEGORY = "ProLoRA"
PREFIX = "ProLoRA"
Basis = io.Custom("PROLORA_BASIS")
Match = io.Custom("PROLORA_MATCH")
LoraModelType = io.Custom("LORA_MODEL")


class ComputeBasis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ComputeBasis", display_name="Compute Basis (ProLoRA)", category=CATEGORY,
            description="Prepares a model for ProLoRA: the top-k singular subspaces of its weights. Bases are computed lazily, "
                        "only for the modules a LoRA touches, and cached on disk across runs.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (source: the one the LoRA was trained on; target: the one to move it to)."),
                io.Clip.Input("clip", optional=True, tooltip="Optional text encoder, needed to transfer a LoRA's text-encoder part."),
                io.Int.Input("subspace_rank", default=0, min=0, max=4096, tooltip="k, the subspace dimension. 0 = auto: min(64, min(m, n)/4) per module, "
                             "so that the chance level k/d of the similarity stays ≤ 0.25. Source and target Compute Basis must agree "
                             "(Match Modules refuses a pair that differs)."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto", tooltip="Where SVDs run; auto = ComfyUI's GPU when it is CUDA. "
                               "Source and target Compute Basis must agree."),
                io.Boolean.Input("use_cache", default=True, tooltip="Keep bases on disk (ComfyUI user folder) so later runs compute no SVD. "
                                 "Source and target Compute Basis must agree."),
                io.String.Input("name", default="", optional=True, tooltip="Name of the model in reports and in the provenance of saved LoRAs "
                                "(e.g. the checkpoint's file name); empty = the model type."),
            ],
            outputs=[Basis.Output(display_name="basis", tooltip="Handle to the model's bases (computed on demand).")],
        )

    @classmethod
    def execute(cls, model, subspace_rank: int, device: str, use_cache: bool, clip=None, name: str = "") -> io.NodeOutput:
        return io.NodeOutput(build_handle(model, clip, subspace_rank or None, device, use_cache, name))


class MatchModules(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MatchModules", display_name="Match Modules (ProLoRA)", category=CATEGORY,
            description="Pairs each source module with its target module and measures their subspace similarity Φ; "
                        "modules below the threshold are not transferred. Both bases are computed with one subspace rank, device and "
                        "cache setting: the two Compute Basis nodes must agree on them, otherwise this node stops and names the difference.",
            inputs=[
                Basis.Input("source_basis", tooltip="Basis of the model the LoRA was trained on."),
                Basis.Input("target_basis", tooltip="Basis of the model to transfer the LoRA to (same subspace_rank, device and use_cache "
                            "as the source's Compute Basis)."),
                LoraModelType.Input("lora", optional=True, tooltip="Restrict the work to the modules this LoRA touches (recommended). "
                                    "Without it, every module is matched."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="A module transfers when Φ_U and Φ_V both reach this (paper: 0.8)."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default="name", tooltip="name: same module name. similarity: the most similar "
                               "same-shape target module (for pruned/renumbered targets like SSD-1B; costs the bases of all candidates)."),
            ],
            outputs=[
                Match.Output(display_name="match", tooltip="Which module goes where, with Φ per module."),
                io.String.Output(display_name="summary", tooltip="Readable summary of the match."),
            ],
        )

    @classmethod
    def execute(cls, source_basis, target_basis, threshold: float, pairing: str, lora=None) -> io.NodeOutput:
        differ = source_basis.settings_differ(target_basis)
        if differ:
            raise ProLoRAError("the two Compute Basis nodes must use the same settings, because both bases are computed, cached and "
                               f"compared with one setting; they differ in {'; '.join(differ)}")
        config = TransferConfig(subspace_rank=source_basis.subspace_rank, threshold=threshold, pairing=pairing,
                                device=source_basis.device, basis=source_basis.settings)
        match = MatchHandle(source_basis, target_basis, config)
        unused: list[str] = []
        if lora is not None:
            parsed = parse_lora_model(lora)
            match = match.with_lora(parsed)
            unused = unused_lines(parsed, match.unmapped)
        else:
            for part in source_basis.parts:
                if part in target_basis.parts:
                    keys = all_weight_keys(source_basis, part)
                    check_shapes_can_match(source_basis.parts[part], target_basis.parts[part], keys, pairing,
                                           f"the source model's {len(keys)} weights")
                    match = match.extended(part, keys)
        verdict = match.module_reports()
        panel = {**match.panel(verdict), "unused": unused}
        return io.NodeOutput(match, "\n".join([match.summary(verdict), *unused]), ui={"prolora_match": [panel]})


class ProjectLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ProjectLoRA", display_name="Project LoRA (ProLoRA)", category=CATEGORY,
            description="Projects the LoRA onto the target's subspace and null space. The output is a LORA_MODEL with ComfyUI-native "
                        "keys: core 'Load LoRA Model' and 'Save LoRA Weights' take it unchanged.",
            inputs=[
                LoraModelType.Input("lora", tooltip="The source LoRA (from Load LoRA (ProLoRA) or any LORA_MODEL)."),
                Match.Input("match", tooltip="From Match Modules."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip="prolora-full: all four subspace/null-space terms (rank r, "
                               "exact when target = source; the fast choice). prolora: the paper's Eq. 3 (rank ≤ 2r). subspace: null space dropped. copy: unchanged. "
                               "casa: cluster-aware spectral arbitration on the full source SVD and the target's departure (slow; rank = input's or out_rank). "
                               "auto: casa when the LoRA's modules moved little (median ‖W_t − W_s‖/‖W_s‖ ≤ 0.13: fine-tunes, pruned or turbo "
                               "descendants), else copy; nothing when fewer than half of the modules pass Φ (default; each module's reason says which)."),
                io.Int.Input("out_rank", default=0, min=0, max=1024, tooltip="Re-compress each module to this rank (0 = keep). Reports the energy dropped."),
                io.Boolean.Input("rescale_to_source_norm", default=False, tooltip="Scale each transferred module back to its source norm."),
            ],
            outputs=[
                LoraModelType.Output(display_name="lora", tooltip="The transferred LoRA (ComfyUI-native keys)."),
                io.String.Output(display_name="report", tooltip="Per-module norms and what was skipped."),
            ],
        )

    @classmethod
    def execute(cls, lora, match, mode: str, out_rank: int, rescale_to_source_norm: bool) -> io.NodeOutput:
        config = replace(match.config, mode=mode, out_rank=out_rank or None, rescale_to_source_norm=rescale_to_source_norm)
        out, results = project_lora_model(lora, match, config)
        modules = [m for r in results for m in r.modules]
        ratio = overall_norm_ratio(modules)
        lines = [f"ProLoRA {mode}: {sum(m.transferred for m in modules)}/{len(modules)} modules transferred; "
                 f"unmapped: {out.metadata.get('prolora.unmapped_modules')}",
                 f"overall norm ratio transferred/source: {ratio:.3f}" if ratio is not None else "nothing transferred"]
        verdict = TransferResult(results[0].lora, {}, modules).summary() if results else None
        if verdict is not None:  # the same groups as Match Modules and the files node (they add up to the modules placed)
            lines += format_summary("modules placed on the source model", verdict, config.threshold)[1:]
        group = modulation_line((m.source_key or m.source, None if m.similarity_u is None else min(m.similarity_u, m.similarity_v or 0.0),
                                 m.transferred, not m.reason.startswith("target")) for m in modules)
        if group:
            lines.append(group)
        for m in modules:
            ratio = f"{m.norm_ratio:.3f}" if m.norm_ratio is not None else "-"
            lines.append(f"{m.source}: {m.reason}, norm ratio {ratio}")
        return io.NodeOutput(out, "\n".join(lines + out.unused))


NODES: list[type[io.ComfyNode]] = [ComputeBasis, MatchModules, ProjectLoRA]
_ = UNET
