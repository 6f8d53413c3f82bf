"""The one-command demo: a real headless ComfyUI with the pack runs example workflow (a) through
the API and writes the comparison grid and the report picture to ``demo_output/``.

Run through ``scripts/demo.sh`` (which sets everything up first and runs ``python -m scripts.demo``
from the repo root); the server harness is ``prolora_dev.server``, shared with the tests."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prolora_dev.host import REPO_ROOT as ROOT
from prolora_dev.server import start_comfy_server
from scripts import workflows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "demo_output"), help="where the pictures go (default demo_output/)")
    ap.add_argument("--write-workflows", action="store_true", help="also rewrite example_workflows/*.json from this server's /object_info")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="prolora-demo-"))
    print(f"[demo] starting ComfyUI (headless, CPU) with the pack; base directory {base}", flush=True)
    t0 = time.perf_counter()
    server = start_comfy_server(base)
    try:
        errors = server.pack_import_errors()
        if errors:
            print("[demo] the pack failed to import:\n" + "\n".join(errors), file=sys.stderr)
            return 1
        if args.write_workflows:
            for p in workflows.write_examples(server.object_info()):
                print(f"[demo] wrote {p}")
        print("[demo] running example workflow (a): the zoo's style LoRA moved to its gently fine-tuned descendant, side by side", flush=True)
        entry = server.run(workflows.side_by_side().api(), timeout=600)
        saved = []
        for node_out in entry["outputs"].values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    src = base / "output" / img.get("subfolder", "") / img["filename"]
                    dst = out / ("grid.png" if "grid" in img["filename"] else "report.png")
                    shutil.copyfile(src, dst)
                    saved.append(dst)
        texts = [m for m in entry["outputs"].values() if "prolora_compare" in m]
        if texts:
            (out / "distances.txt").write_text(str(texts[0]["prolora_compare"][0].get("distances", "")) + "\n")
        print(f"[demo] done in {time.perf_counter() - t0:.0f} s:")
        for p in sorted(saved):
            print(f"  {p}")
        return 0 if len(saved) == 2 else 1
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
