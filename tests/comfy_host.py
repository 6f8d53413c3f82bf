"""Helpers for tests that run against the REAL ComfyUI host in ``.comfyui/``.

Nothing here fakes ComfyUI: models are real ``comfy.model_patcher.ModelPatcher``
objects, the CLIP is a real ``comfy.sd.CLIP`` and the server is ComfyUI's own
``main.py`` in a subprocess.

This module imports no ComfyUI code at import time (ComfyUI modules are imported
inside the functions), so test files may ``from comfy_host import ...`` even where
the host is missing; every helper then fails with a message that says to run
``scripts/setup.sh``. ``tests/conftest.py`` must have run first (it sets
``sys.path`` and ``comfy.cli_args.args.cpu``); under pytest it always has.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    import requests
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = REPO_ROOT / ".comfyui"
PACK_DIR_NAME = "comfyui-prolora"
SETUP_HINT = (
    f"The ComfyUI host is not set up ({COMFYUI_DIR / 'main.py'} is missing). "
    "Run scripts/setup.sh first: it creates .venv/ and unpacks ComfyUI 0.3.75 into .comfyui/."
)

# --------------------------------------------------------------------------------------
# Host presence and the pack import
# --------------------------------------------------------------------------------------


def require_host_files() -> None:
    """Fail the current test (never skip) when the ComfyUI host is not set up."""
    if not (COMFYUI_DIR / "main.py").is_file():
        pytest.fail(SETUP_HINT, pytrace=False)


def require_comfyui() -> None:
    """Fail the current test (never skip) when the ComfyUI host is missing or mis-wired for in-process use."""
    require_host_files()
    spec = importlib.util.find_spec("comfy")  # a namespace package: no __init__.py, no origin
    locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    if (COMFYUI_DIR / "comfy").resolve() not in locations[:1]:
        pytest.fail(f"`comfy` does not resolve to {COMFYUI_DIR}/comfy: was tests/conftest.py loaded?", pytrace=False)


def comfy_module_name(pack_dir: Path) -> str:
    """The ``sys.modules`` name ComfyUI gives a custom-node directory (``nodes.load_custom_node``)."""
    return str(pack_dir).replace(".", "_x_")


def load_pack(root: Path = REPO_ROOT, module_name: str | None = None, *, reload: bool = False) -> ModuleType:
    """Import the node pack at ``root`` the way ComfyUI does and return the package module.

    ComfyUI calls ``spec_from_file_location(<dir path with '.'→'_x_'>, <dir>/__init__.py)``,
    registers the module in ``sys.modules`` and executes it; the pack's relative imports
    then resolve below that name. ``module_name`` defaults to that same scheme. A pack
    already imported under the name is returned as is unless ``reload`` is true.
    """
    name = module_name or comfy_module_name(root)
    if not reload and name in sys.modules:
        return sys.modules[name]
    init = root / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist: nothing to load as a ComfyUI node pack")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    for sub in [m for m in sys.modules if m.startswith(name + ".")]:
        del sys.modules[sub]  # a reload must not reuse stale submodules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# --------------------------------------------------------------------------------------
# Tiny SD1.5 / SDXL UNets as real ComfyUI MODELs
# --------------------------------------------------------------------------------------

#: Width of the SDXL "pooled_output" (real SDXL: 1280, the CLIP-G projection).
SDXL_POOLED_DIM = 32
#: SDXL's ``encode_adm`` appends six 256-wide size/crop embeddings to the pooled output.
SDXL_ADM_IN_CHANNELS = SDXL_POOLED_DIM + 6 * 256

_COMMON_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

#: SD1.5 layout in miniature: attention at every level, conv proj_in/proj_out, no ADM.
#: ``supported_models.SD15`` adds ``num_heads=8, num_head_channels=-1`` (4- and 8-wide heads here).
SD15_UNET_CONFIG: dict[str, Any] = {
    **_COMMON_UNET, "adm_in_channels": None, "context_dim": 32, "use_linear_in_transformer": False,
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
}

#: SDXL layout in miniature: no attention at the first level, 2-deep linear-proj transformers
#: below it, a "sequential" label embedding fed by pooled_output + 6x256 size embeddings.
#: SDXL keeps BASE's ``num_head_channels=64``, so attention needs >= 64 channels (level 1 has 64).
SDXL_UNET_CONFIG: dict[str, Any] = {
    **_COMMON_UNET, "num_classes": "sequential", "adm_in_channels": SDXL_ADM_IN_CHANNELS, "context_dim": 64,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 1,
}


def init_parameters_(module: torch.nn.Module, seed: int) -> None:
    """Deterministically overwrite every parameter of ``module`` (comfy.ops leaves them uninitialised):
    the zoo's own initialiser (``evidence.models.init_parameters_``), so tests and zoo build alike.

    Imported lazily: ``evidence`` configures ComfyUI on import, which is a no-op only once
    ``comfy.model_management`` is loaded (every caller here has loaded it)."""
    from evidence.models import init_parameters_ as zoo_init

    zoo_init(module, seed)


def build_model(kind: str, unet_config: dict[str, Any], seed: int) -> ModelPatcher:
    """Build a ComfyUI ``MODEL`` of ``kind`` ("SD15" or "SDXL") from a full ``unet_config``:
    the zoo's own builder (``evidence.models.build_model``, imported lazily as above).

    The config actually used (with the model class's extra keys such as num_heads) stays
    available as ``patcher.model.model_config.unet_config``; passing it back here rebuilds
    the same architecture.
    """
    require_comfyui()
    import comfy.model_management
    from evidence.models import build_model as zoo_build

    assert comfy.model_management.get_torch_device() == torch.device("cpu"), "ComfyUI is not in CPU mode (args.cpu not set early enough?)"
    return zoo_build(unet_config, seed=seed, kind=kind)


def tiny_sd15_model(seed: int = 0) -> ModelPatcher:
    """A tiny SD1.5-shaped UNet (~1.1 M parameters) as a ComfyUI ``MODEL``."""
    return build_model("SD15", SD15_UNET_CONFIG, seed)


def tiny_sdxl_model(seed: int = 0) -> ModelPatcher:
    """A tiny SDXL-shaped UNet (ADM/label_emb included) as a ComfyUI ``MODEL``."""
    return build_model("SDXL", SDXL_UNET_CONFIG, seed)


#: Flux.1 in miniature (``comfy.ldm.flux.model.Flux``): hidden 64, 2 heads of 32 (axes_dim sums to 32),
#: one double and one single block, mlp_ratio 4 as in Flux.1, so ComfyUI's key map slices the fused
#: weights as for the real model: ``img_attn.qkv`` [192, 64] (q, k, v rows of 64), single-block
#: ``linear1`` [448, 64] (q, k, v, then ``proj_mlp`` 256 rows).
FLUX_UNET_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}

#: Chroma in miniature (``comfy.ldm.chroma.model.Chroma``): the tiny Flux's blocks without their
#: modulation layers (``img_mod``/``txt_mod``/``modulation.lin``), one shared approximator instead.
CHROMA_UNET_CONFIG: dict[str, Any] = {
    "image_model": "chroma", "in_channels": 16, "out_channels": 16, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 344, "hidden_dim": 32, "n_layers": 1,
}


def tiny_flux_model(seed: int = 0) -> ModelPatcher:
    """A tiny Flux.1-shaped transformer (ComfyUI's own ``supported_models.Flux``) as a ``MODEL``."""
    return build_model("Flux", FLUX_UNET_CONFIG, seed)


def tiny_chroma_from(flux: ModelPatcher, eps: float, seed: int) -> ModelPatcher:
    """A Chroma-like descendant of a tiny Flux (ComfyUI's own ``supported_models.Chroma``): every
    weight the two share by name and shape is the Flux one plus ``eps`` x (mean |p|) x noise, as in
    :func:`perturbed_copy`; Chroma's own weights (the approximator) keep their seeded init."""
    target = build_model("Chroma", CHROMA_UNET_CONFIG, seed=1)
    src = flux.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in target.model.state_dict().items():
            if key in src and src[key].shape == p.shape and key.startswith("diffusion_model."):
                p.copy_(src[key] + eps * src[key].abs().mean() * torch.randn(p.shape, generator=gen))
    return target


def perturbed_copy(patcher: ModelPatcher, eps: float, seed: int) -> ModelPatcher:
    """A "fine-tuned" descendant: a new model of the same architecture whose every parameter is the
    source's plus ``eps`` × (mean |p|) × Gaussian noise (seeded)."""
    target = build_model(model_kind(patcher), patcher.model.model_config.unet_config, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p_src, p_tgt in zip(patcher.model.parameters(), target.model.parameters()):
            p_tgt.copy_(p_src + eps * p_src.abs().mean() * torch.randn(p_src.shape, generator=gen))
    return target


def kohya_lora(patcher: ModelPatcher, modules: list[str], *, rank: int = 4, alpha: float | None = 4.0, scale: float = 0.1,
               seed: int = 1) -> dict[str, torch.Tensor]:
    """A random kohya LoRA (``lora_unet_<module with underscores>``) on ``modules`` of the UNet:
    linear factors for linear weights, LoCon factors (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``)
    for conv weights; entries ~ N(0, scale²); ``alpha=None`` writes no alpha."""
    sd = patcher.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for mod in modules:
        w = sd[f"diffusion_model.{mod}.weight"]
        name = "lora_unet_" + mod.replace(".", "_")
        out[f"{name}.lora_down.weight"] = scale * torch.randn((rank, *w.shape[1:]), generator=gen)
        out[f"{name}.lora_up.weight"] = scale * torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=gen)
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def model_kind(patcher: ModelPatcher) -> str:
    """"SD15" or "SDXL" for a model built by this module (from its model_config class)."""
    return type(patcher.model.model_config).__name__


def tiny_conditioning(patcher: ModelPatcher, seed: int = 0, tokens: int = 77) -> list[list[Any]]:
    """A ``CONDITIONING`` matching the model: ``[[cond, {...}]]``; SDXL also gets ``pooled_output``."""
    unet_config = patcher.model.model_config.unet_config
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn((1, tokens, unet_config["context_dim"]), generator=gen)
    extra: dict[str, Any] = {}
    adm = unet_config.get("adm_in_channels")
    if adm:
        extra["pooled_output"] = torch.randn((1, adm - 6 * 256), generator=gen)
    return [[cond, extra]]


def sample_step(patcher: ModelPatcher, positive: list[list[Any]], negative: list[list[Any]], *, seed: int = 0,
                steps: int = 1, cfg: float = 2.0, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Run ComfyUI's own KSampler path (``nodes.common_ksampler``) on an empty latent; returns the samples."""
    require_comfyui()
    import nodes

    latent = {"samples": torch.zeros((1, 4, size[0], size[1]))}
    (out,) = nodes.common_ksampler(patcher, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def unet_weights(patcher: ModelPatcher, *, patched: bool = False) -> dict[str, torch.Tensor]:
    """The UNet weights keyed as in ``BaseModel.state_dict()`` (``diffusion_model.…``).

    Uses the patcher's backups, so the result is the original weights even while ComfyUI
    holds the model loaded with patches applied; ``patched=True`` applies the patcher's
    patches (LoRAs etc.) with ``comfy.lora.calculate_weight`` instead.
    """
    import comfy.lora

    out: dict[str, torch.Tensor] = {}
    for key, entry in patcher.get_key_patches("diffusion_model.").items():
        weight, convert = entry[0]
        weight = convert(weight.detach().to("cpu", torch.float32, copy=True))
        if patched and len(entry) > 1:
            weight = comfy.lora.calculate_weight(entry[1:], weight, key)
        out[key] = weight.contiguous()
    return out


def save_model_state(patcher: ModelPatcher, path: Path, *, prefix: str = "model.diffusion_model.",
                     patched: bool = False) -> Path:
    """Write the UNet's weights to ``path`` as safetensors, in checkpoint layout by default.

    Keys are ``prefix + <UNetModel key>`` (``model.diffusion_model.`` is what ComfyUI's
    ``state_dict_for_saving`` writes into checkpoints; pass ``prefix=""`` for a bare
    diffusion-model file). The metadata holds ``prolora.model_kind`` and the full
    ``prolora.unet_config`` (JSON) so :func:`load_model_state` can rebuild the model.
    """
    import safetensors.torch

    weights = unet_weights(patcher, patched=patched)
    tensors = {prefix + k[len("diffusion_model."):]: v for k, v in weights.items()}
    metadata = {
        "prolora.model_kind": model_kind(patcher),
        "prolora.unet_config": json.dumps(patcher.model.model_config.unet_config),
        "prolora.key_prefix": prefix,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def save_tiny_pair(models_dir: Path, target_seed: int, eps: float = 0.05) -> ModelPatcher:
    """Write a tiny SD1.5 source (seed 0) and a :func:`perturbed_copy` of it as
    ``models_dir/diffusion_models/tiny_src|tiny_tgt.safetensors``; returns the source."""
    src = tiny_sd15_model(0)
    save_model_state(src, models_dir / "diffusion_models" / "tiny_src.safetensors")
    save_model_state(perturbed_copy(src, eps, seed=target_seed), models_dir / "diffusion_models" / "tiny_tgt.safetensors")
    return src


def load_model_state(path: Path) -> ModelPatcher:
    """Rebuild a model written by :func:`save_model_state` (architecture from its metadata):
    ``evidence.models.load_zoo_model``, which reads the same metadata scheme."""
    from evidence.models import load_zoo_model

    return load_zoo_model(path)


# --------------------------------------------------------------------------------------
# Tiny CLIP (SD1.5 clip_l layout)
# --------------------------------------------------------------------------------------

#: Overrides of ComfyUI's sd1_clip_config.json: 2 layers of width 32 (vocab stays 49408 for the real tokenizer).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32,
}


def tiny_clip(seed: int = 0) -> CLIP:
    """A tiny SD1.5-style text encoder as a real ComfyUI ``CLIP`` (fp32, CPU).

    Real ``SD1Tokenizer`` + ``SD1ClipModel`` with a shrunken ``clip_l`` config; its
    hidden size (32) equals the tiny SD1.5 UNet's ``context_dim``, so CLIPTextEncode
    output feeds ``tiny_sd15_model`` directly.
    """
    require_comfyui()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={
        "clip_l_model_config": dict(TINY_CLIP_CONFIG), "dtype": torch.float32,  # CPU default would be fp16
        "load_device": cpu, "offload_device": cpu, "initial_device": cpu,
    })
    init_parameters_(clip.cond_stage_model, seed)
    return clip


# --------------------------------------------------------------------------------------
# A real ComfyUI server in a subprocess
# --------------------------------------------------------------------------------------

MODEL_SUBDIRS = ("checkpoints", "loras", "diffusion_models", "unet", "text_encoders", "clip", "vae", "embeddings", "configs")


class PromptRejected(RuntimeError):
    """``POST /prompt`` refused the workflow (HTTP 4xx); ``.response`` holds the decoded JSON body."""

    def __init__(self, status: int, response: Any) -> None:
        super().__init__(f"/prompt answered HTTP {status}: {json.dumps(response)[:2000]}")
        self.status = status
        self.response = response


class PromptFailed(RuntimeError):
    """A prompt ran but ended with status "error"; ``.entry`` is its ``/history`` entry."""

    def __init__(self, prompt_id: str, entry: dict[str, Any]) -> None:
        messages = [m for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        super().__init__(f"prompt {prompt_id} failed: {json.dumps(messages)[:4000]}")
        self.entry = entry


@dataclass
class ComfyServer:
    """A running ``main.py`` subprocess bound to a loopback port."""

    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    pack_dir_name: str = PACK_DIR_NAME
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _http: requests.Session | None = field(default=None, repr=False)
    _object_info: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def http(self) -> requests.Session:
        """A ``requests`` session that ignores proxy environment variables (loopback only)."""
        if self._http is None:
            import requests

            self._http = requests.Session()
            self._http.trust_env = False
        return self._http

    @property
    def pack_dir(self) -> Path:
        """Where the pack sits in the server's custom_nodes/ (a symlink to the repo, or a copy)."""
        return self.base_dir / "custom_nodes" / self.pack_dir_name

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """``GET path`` and decode JSON (raises on HTTP errors)."""
        r = self.http.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        """``/object_info``: every node class the server registered (cached)."""
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info", timeout=60.0)
        return self._object_info

    def post_prompt(self, api_workflow: dict[str, Any]) -> str:
        """Queue an API-format workflow; returns its prompt id or raises :class:`PromptRejected`."""
        r = self.http.post(self.url + "/prompt", json={"prompt": api_workflow, "client_id": self.client_id}, timeout=30.0)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code != 200:
            raise PromptRejected(r.status_code, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        The entry has ``outputs`` and ``status`` (``status_str`` "success" or "error",
        ``messages``). Raises ``TimeoutError`` (with the log tail) or ``RuntimeError`` if
        the server died.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}) while waiting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def run(self, api_workflow: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Queue, wait, and require success; returns the history entry (raises :class:`PromptFailed`)."""
        prompt_id = self.post_prompt(api_workflow)
        entry = self.wait(prompt_id, timeout)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(prompt_id, entry)
        return entry

    def log_text(self) -> str:
        """The whole server log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        """The last ``lines`` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_line(self) -> str | None:
        """The "Import times for custom nodes" line for our pack, or None if it was never tried."""
        return find_pack_import_line(self.log_text(), str(self.pack_dir))

    def pack_import_errors(self) -> list[str]:
        """Log lines saying our pack failed to load (empty when it loaded cleanly)."""
        return pack_import_errors(self.log_text(), str(self.pack_dir))

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._http is not None:
            self._http.close()


def find_pack_import_line(log: str, pack_path: str) -> str | None:
    """The line of ComfyUI's import-times table naming ``pack_path`` (``"  0.1 seconds: <path>"``)."""
    pattern = re.compile(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: " + re.escape(pack_path) + r"\s*$")
    return next((line for line in log.splitlines() if pattern.match(line)), None)


def pack_import_errors(log: str, pack_path: str) -> list[str]:
    """Lines of a ComfyUI log reporting that the custom node at ``pack_path`` did not load.

    Covers ``Cannot import <path> module for custom nodes``, V3 ``comfy_entrypoint``
    warnings, "Skip <path> ... lack of NODE_CLASS_MAPPINGS" and the ``(IMPORT FAILED)``
    import-times line. Failures of other modules (e.g. comfy_extras needing torchaudio)
    are ignored.
    """
    startup = log.split("\nStarting server", 1)[0]  # later lines are execution logs, not imports
    lines = startup.splitlines()
    markers = ("Cannot import", "IMPORT FAILED", "comfy_entrypoint", "Skip ", "Error while")
    errors: list[str] = []
    for i, line in enumerate(lines):
        if pack_path in line and any(m in line for m in markers):
            if "Cannot import" in line:  # ComfyUI logs the traceback just before this line
                start = max((j for j in range(i) if lines[j].startswith("Traceback")), default=i)
                errors.extend(lines[start:i])
            errors.append(line)
    if find_pack_import_line(log, pack_path) is None:
        errors.append(f"no import-times line for {pack_path}: ComfyUI never tried to load it")
    return errors


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: Path, pack_root: Path = REPO_ROOT, pack_dir_name: str = PACK_DIR_NAME) -> Path:
    """Lay out a ComfyUI ``--base-directory``: custom_nodes/<pack> (symlink, else copy), models/*, input/, output/."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / pack_dir_name
    if not link.exists():
        try:
            link.symlink_to(pack_root, target_is_directory=True)
        except OSError:
            shutil.copytree(pack_root, link, ignore=shutil.ignore_patterns(
                ".git", ".venv", ".comfyui", ".comfyui.partial", "__pycache__", ".pytest_cache", ".hypothesis"))
    for sub in MODEL_SUBDIRS:
        (base_dir / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base_dir / sub).mkdir(exist_ok=True)
    return base_dir


def start_comfy_server(base_dir: Path, *, startup_timeout: float = 90.0, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start ``.comfyui/main.py --cpu`` on a free loopback port with ``base_dir`` as base directory.

    Waits until ``/object_info`` answers; on failure stops the process and fails the test
    with the log tail. The caller must call :meth:`ComfyServer.stop`.
    """
    require_host_files()
    prepare_base_dir(base_dir)
    port = free_loopback_port()
    log_path = base_dir / "comfyui.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base_dir), "--disable-api-nodes", "--database-url", "sqlite:///:memory:", *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # ComfyUI's dir must be sys.path[0], nothing of ours before it
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base_dir=base_dir, log_path=log_path, process=process)
    import requests

    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            server.stop()
            pytest.fail(f"ComfyUI server exited with {process.returncode} during start-up:\n{server.log_tail()}", pytrace=False)
        try:
            server.object_info()
            return server
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"ComfyUI server did not answer /object_info within {startup_timeout}s:\n{server.log_tail()}", pytrace=False)
        time.sleep(0.25)
