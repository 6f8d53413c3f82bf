"""ProLoRA engine: training-free LoRA transfer between related diffusion base models.

Pure torch, no ComfyUI import. See the README for the math and the defaults.
"""
from .basis import Basis, BasisSettings, clamp_rank, compute_basis, default_rank
from .cache import BasisCache, default_cache_dir
from .errors import ProLoRAError
from .lora import LoraFile, LoraModule, Module, parse_state_dict, read_lora
from .projection import MODES, Factors, project, recompress
from .similarity import Similarity, basis_similarity, subspace_similarity
from .transfer import ModuleReport, Planned, TransferConfig, TransferResult, plan_by_names, transfer
from .weights import SafetensorsWeights, WeightSource

__all__ = [
    "Basis", "BasisSettings", "clamp_rank", "compute_basis", "default_rank", "BasisCache", "default_cache_dir", "ProLoRAError",
    "LoraFile", "LoraModule", "Module", "parse_state_dict", "read_lora", "MODES", "Factors", "project", "recompress", "Similarity",
    "basis_similarity", "subspace_similarity", "ModuleReport", "Planned", "TransferConfig", "TransferResult", "plan_by_names",
    "transfer", "SafetensorsWeights", "WeightSource",
]
