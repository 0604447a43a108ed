"""Write docs/models.md from the catalog (streamtsm/hub/catalog.toml), so the page and the data never disagree.

    python tools/make_models_doc.py           # rewrite docs/models.md
    python tools/make_models_doc.py --check   # exit 1 if docs/models.md is not what the catalog gives (tests run it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamtsm.hub import catalog
from streamtsm.models import get_spec

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"

INTRO = """\
# Published models

Every checkpoint below runs by name: `--weights NAME` wherever a weights file is accepted (`run`, `export-onnx`,
`export-triton`, `train`, `eval`, a site config's `weights`), `streamtsm.models.load("NAME")` or
`create(ARCH, pretrained="NAME")` in Python. The first use downloads the file from its publisher into the cache
(`$STREAMTSM_HOME/checkpoints`, else `~/.cache/streamtsm/checkpoints`; a progress bar on a terminal), verifies it
(the publisher's SHA-256 where one is published, else the SHA-256 recorded at the first download), and loads it
strictly into the entry's architecture with the publisher's class names (in the publisher's class order), input
size, mean/std, frame stride and clip settings: `streamtsm run --camera 0 --weights tsm_mobilenetv2_jester_online`
names hand gestures with no other flag.

- `streamtsm models` lists these entries beside the architectures, and whether each is cached.
- `streamtsm download NAME... [--to DIR]` fetches ahead of use; a `DIR` (or a whole `STREAMTSM_HOME`) copied to a
  machine without internet works there with `STREAMTSM_HOME=DIR`.
- `--offline` (anywhere on the command line) or `STREAMTSM_OFFLINE=1` never touches the network: a file not in the
  cache is one error naming the URL and where to put the file by hand.
- A failed download (host unreachable, HTTP error, hash mismatch, transfer cut short, cache not writable) is one
  line naming the URL and how to place the file by hand (`--weights PATH`, or the cache path), and leaves nothing
  partial in the cache.

This page is written by `python tools/make_models_doc.py` from `streamtsm/hub/catalog.toml`, which cites, entry by
entry, where each URL, hash, accuracy and class order comes from, and says where the publisher leaves a fact open.
Licenses are the publishers'; the weights of the ImageNet backbones carry the terms of the data they were trained on.
"""


def settings(entry: catalog.Entry) -> dict:
    """What the entry's model runs with: the registry's defaults, the entry's overrides, and for a streamtsm
    checkpoint (which names its own settings) what it records."""
    values = {**get_spec(entry.arch).defaults, **entry.overrides}
    if entry.layout == "streamtsm" and entry.packaged:
        from streamtsm.models import read_checkpoint

        recorded = read_checkpoint(catalog.local_path(entry))["config"]
        values.update({k: v for k, v in recorded.items() if k in ("input_size", "clip_len", "frame_interval")})
    return values


def frames(entry: catalog.Entry) -> str:
    o = settings(entry)
    if get_spec(entry.arch).kind == "online":
        k = int(o.get("frame_interval", 1))
        return "1 per step" + (f", stride {k}" if k > 1 else "")
    if entry.backbone:
        return "(backbone)"
    return f"{o.get('clip_len', o.get('num_segments', 8))}x{o.get('frame_interval', 1)}"


def size(entry: catalog.Entry) -> str:
    if entry.size is not None:
        return f"{entry.size / 1e6:.1f} MB"
    path = catalog.local_path(entry)
    return f"{path.stat().st_size / 1e6:.1f} MB" if entry.packaged and path.is_file() else "not stated"


def render() -> str:
    rows = ["| name | architecture | dataset | classes | frames (clip x stride) | input | published accuracy "
            "| size | license |",
            "|---|---|---|---|---|---|---|---|---|"]
    for e in catalog.entries():
        inp = settings(e).get("input_size", 224)
        rows.append(f"| `{e.name}` | `{e.arch}` | {e.dataset} | {e.num_classes} | {frames(e)} | {inp} | "
                    f"{e.accuracy} | {size(e)} | {e.license} |")
    sources = ["## Sources", ""]
    for e in catalog.entries():
        where = f"<{e.url}>" if e.url else f"packaged: `streamtsm/assets/{e.filename}`"
        digest = f"sha256 `{e.sha256}`" if e.sha256 else "no published hash (recorded at the first download)"
        labels = f"`streamtsm/hub/labels/{e.labels}`" if e.labels else "the names the checkpoint records"
        sources.append(f"- `{e.name}`: {e.description}. File: {where}, {digest}; layout `{e.layout}`; class names: "
                       f"{labels}. Source: {e.source}.")
    return INTRO + "\n" + "\n".join(rows) + "\n\n" + "\n".join(sources) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/make_models_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
