"""Transfer LoRA (files): stream source and target weights from disk, write each transferred LoRA
next to its input in models/loras, named after the target (several targets: one output each).
Neither model is loaded for sampling; ComfyUI's own key maps name the modules
(``prolora_host.detect_model``). The steps are :func:`prolora_core.file_transfer.transfer_files`,
shared with the CLI."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..prolora_core.cache import DEFAULT_MAX_GB, BasisCache
from ..prolora_core.config import default_threads
from ..prolora_core.errors import ProLoRAError
from ..prolora_core.file_transfer import transfer_files
from ..prolora_core.outputs import DEFAULT_PATTERN, free_path, output_stem
from ..prolora_core.projection import MODES
from ..prolora_core.transfer import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, TransferConfig
from ..prolora_host import detect_model
from .bridge import cache_dir, check_interrupt, engine_device, progress
from .transfer_nodes import CATEGORY, PREFIX

MODEL_FOLDERS = ("checkpoints", "diffusion_models")


def model_files() -> list[str]:
    """``folder/name`` entries of every safetensors file in checkpoints and diffusion_models, and of
    every GGUF file in diffusion_models (where ComfyUI-GGUF's loader looks)."""
    found = [f"{folder}/{name}" for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder) if name.endswith(".safetensors")]
    gguf = {name for base in folder_paths.get_folder_paths("diffusion_models")
            for name in folder_paths.filter_files_extensions(folder_paths.recursive_search(base)[0], {".gguf"})}
    return found + [f"diffusion_models/{name}" for name in sorted(gguf)]


def resolve_model_file(entry: str) -> Path:
    folder, _, name = entry.partition("/")
    path = folder_paths.get_full_path(folder, name) if folder in MODEL_FOLDERS else None
    if path is None:
        raise ProLoRAError("not found in models/checkpoints or models/diffusion_models", file=entry)
    return Path(path)


class TransferLoRAFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = model_files()
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id=f"{PREFIX}TransferLoRAFiles", display_name="Transfer LoRA (files) (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="One node for the whole transfer: reads the source and target checkpoints from disk module by module "
                        "(no model is loaded for sampling) and writes the transferred LoRA(s) into models/loras.",
            inputs=[
                io.Combo.Input("source_model", options=files, tooltip="Checkpoint or diffusion model the LoRA was trained on."),
                io.Combo.Input("target_model", options=files, tooltip="Checkpoint or diffusion model to move the LoRA to."),
                io.Combo.Input("lora_name", options=loras, tooltip="The LoRA to transfer (models/loras)."),
                io.String.Input("more_loras", default="", multiline=True, tooltip="Further LoRA file names in models/loras, one per line: "
                                "all share one pass over the bases."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip="Projection mode (see Project LoRA)."),
                io.Int.Input("subspace_rank", default=0, min=0, max=4096, tooltip="k; 0 = auto min(64, min(m, n)/4)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01, tooltip="Minimum Φ_U and Φ_V to transfer a module."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default="name", tooltip="name, or similarity for pruned/renumbered targets."),
                io.String.Input("filename_pattern", default=DEFAULT_PATTERN, tooltip="Output file name, saved in the input LoRA's own folder: "
                                "{lora} {target} {source} {mode} are replaced by the names; an existing file is never overwritten (_2, _3 … appended)."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto", tooltip="Where SVDs run."),
                io.Int.Input("threads", default=0, min=0, max=256, optional=True, tooltip="CPU threads for bases and projections; 0 = half the cores, "
                             "at most 4, so that sampling beside the transfer keeps most of the machine."),
                io.Float.Input("cache_max_gb", default=DEFAULT_MAX_GB, min=0.0, max=4096.0, step=0.5, optional=True,
                               tooltip="Size limit of the basis cache (ComfyUI user folder): after the run the least recently used bases are "
                                       "removed until it fits. 0 keeps no bases. Clear it with the ProLoRA Cache node."),
                io.String.Input("more_targets", default="", multiline=True, optional=True,
                                tooltip="Further target models (folder/name as in target_model), one per line, e.g. Wan 2.2's second expert: "
                                        "one output per LoRA and target, named after the target; the source's bases are computed once."),
            ],
            outputs=[
                io.String.Output(display_name="lora_names", tooltip="Saved file names (one per line), as core 'Load LoRA' lists them."),
                io.String.Output(display_name="report", tooltip="What was transferred and skipped."),
            ],
        )

    @classmethod
    def execute(cls, source_model: str, target_model: str, lora_name: str, more_loras: str, mode: str, subspace_rank: int,
                threshold: float, pairing: str, filename_pattern: str, device: str, threads: int = 0, cache_max_gb: float = DEFAULT_MAX_GB,
                more_targets: str = "") -> io.NodeOutput:
        names = [lora_name] + _lines(more_loras)
        paths = []
        for n in names:
            p = folder_paths.get_full_path("loras", n)
            if p is None:
                raise ProLoRAError("not found in models/loras", file=n)
            paths.append(Path(p))
        targets = list(dict.fromkeys([target_model] + _lines(more_targets)))
        config = TransferConfig(mode=mode, subspace_rank=subspace_rank or None, threshold=threshold, pairing=pairing, device=engine_device(device),
                                cpu_threads=threads or default_threads())
        stems = [[output_stem(filename_pattern, p, t, source_model, mode) for t in targets] for p in paths]
        if len(targets) > 1 and len({s for row in stems for s in row}) < len(paths) * len(targets):
            raise ProLoRAError(f"the file name pattern {filename_pattern!r} gives two outputs the same name: with several targets it needs {{target}}")
        cache = BasisCache(cache_dir(), config.basis)
        warnings: list[str] = []  # modules ComfyUI's key map does not place, LoRAs left out …: named in the report
        run = transfer_files(resolve_model_file(source_model), [resolve_model_file(t) for t in targets], paths, config,
                             lambda li, ti: free_path(paths[li].parent, stems[li][ti]), detect=detect_model, need_detect=True, cache=cache,
                             progress=progress(1), check_interrupt=check_interrupt, warn=warnings.append,
                             listed_in="the CLI's --report JSON", cache_max_bytes=int(max(cache_max_gb, 0.0) * 2**30),
                             on_saved=lambda out: f"  saved as {lora_list_name(out)}")
        evicted = run.evicted
        lines = run.lines + [f"warning: {w}" for w in warnings]
        lines.append(cache.describe(cache_max_gb) + (f"; removed the {evicted} least recently used" if evicted else ""))
        saved = [lora_list_name(p) for p in run.written]
        if not saved:
            raise ProLoRAError("no module could be transferred:\n" + "\n".join(lines))
        return io.NodeOutput("\n".join(saved), "\n".join(lines), ui={"text": lines})


def _lines(text: str) -> list[str]:
    return [n.strip() for n in text.splitlines() if n.strip()]


def lora_list_name(path: Path) -> str:
    """The name core 'Load LoRA' lists a file in models/loras under (``sdxl/ink__to_ssd-1b.safetensors``)."""
    for root in folder_paths.get_folder_paths("loras"):
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name
