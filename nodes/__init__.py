"""ComfyUI nodes: thin V3 wrappers around prolora_core (no math here)."""
