"""The shipped tiny zoo as ordinary ComfyUI objects, so example workflows run in stock ComfyUI
with nothing else installed: models, LoRAs, conditioning, and a decoder from latents to images.

The zoo's "latent" is the image itself (8×8 RGB as ``2·rgb − 1`` in channels 0–2), see
``zoo/README.md``; the decoder is therefore exact, not learned."""
from __future__ import annotations

import torch
from comfy_api.latest import io
from safetensors.torch import load_file

from ..prolora_core.zoo import CLASSES, LATENT_SCALE, LORAS, MODELS, UNTRAINED, zoo_file
from .lora_nodes import load_lora_file
from .tiny_model_node import load_tiny_model
from .transfer_nodes import CATEGORY, PREFIX, LoraModelType


class DemoModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}DemoModels", display_name="Demo Models (ProLoRA)", category=CATEGORY,
            description="The project's tiny zoo: a source UNet, fine-tuned and pruned descendants, a 4-step turbo, an unrelated model, "
                        "and LoRAs trained on the source.",
            inputs=[
                io.Combo.Input("target", options=list(MODELS)[1:], default="descendant, gentle fine-tune",
                               tooltip="Which model plays the target: a gentle fine-tune of the source (transfer works well), a strong one "
                                       "(its domain drifted: transfer recovers about half), a pruned copy with removed and renamed blocks "
                                       "distilled from the source (set Match Modules' pairing to similarity), a 4-step turbo distilled "
                                       "from the source (sample it with euler, sgm_uniform, 4 steps, cfg 1), or an unrelated model "
                                       "(the filter skips it)."),
                io.Combo.Input("lora", options=list(LORAS), default="style", tooltip="style: yellow diagonal stripes; concept: a red ring (prompt 'red ring')."),
            ],
            outputs=[
                io.Model.Output(display_name="source", tooltip="The base the LoRA was trained on."),
                io.Model.Output(display_name="target", tooltip="The chosen target model."),
                LoraModelType.Output(display_name="lora", tooltip="The LoRA trained on the source."),
                LoraModelType.Output(display_name="lora_trained_on_target", tooltip="The same LoRA trained from scratch on the target (the reference). "
                                             "The turbo has none (nobody trains on a turbo): there it is the source's LoRA, as people load it."),
            ],
        )

    @classmethod
    def execute(cls, target: str, lora: str) -> io.NodeOutput:
        tgt = MODELS[target]
        trained_on = "source" if tgt in UNTRAINED else tgt
        return io.NodeOutput(load_tiny_model(zoo_file("source")), load_tiny_model(zoo_file(tgt)),
                             load_lora_file(str(zoo_file(f"lora_{lora}_source"))), load_lora_file(str(zoo_file(f"lora_{lora}_{trained_on}"))))


class DemoConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}DemoConditioning", display_name="Demo Conditioning (ProLoRA)", category=CATEGORY,
            description="The zoo's fixed 'text embeddings' (the tiny models have no text encoder).",
            inputs=[io.Combo.Input("prompt", options=list(CLASSES), default="disc", tooltip="What to draw.")],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="The prompt's conditioning."),
                     io.Conditioning.Output(display_name="negative", tooltip="The empty prompt (for CFG).")],
        )

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        table = load_file(str(zoo_file("conditioning")))["context"]
        return io.NodeOutput([[table[CLASSES.index(prompt)][None].clone(), {}]], [[table[len(CLASSES)][None].clone(), {}]])


class DemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}DemoDecode", display_name="Demo Decode (ProLoRA)", category=CATEGORY,
            description="Turns the zoo's latents (the image itself) into an IMAGE, enlarged with sharp pixels.",
            inputs=[io.Latent.Input("samples", tooltip="A sampled LATENT from a zoo model."),
                    io.Int.Input("scale", default=16, min=1, max=64, tooltip="Pixel enlargement factor (the zoo's images are 8×8).")],
            outputs=[io.Image.Output(display_name="image", tooltip="RGB in [0, 1].")],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
        x = samples["samples"].float() * LATENT_SCALE
        rgb = ((x[:, :3] + 1) / 2).clamp(0, 1)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
        return io.NodeOutput(rgb.permute(0, 2, 3, 1).contiguous())


NODES: list[type[io.ComfyNode]] = [DemoModels, DemoConditioning, DemoDecode]
