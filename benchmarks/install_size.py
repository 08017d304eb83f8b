"""What ``pip install clipsearch`` puts on disk: the installed size of its dependency closure.

Walks the installed distributions from ``clipsearch``'s requirements (``importlib.metadata``,
recursively, extras and environment markers evaluated for this machine) and adds up the files each
one's ``RECORD`` lists, so the figure is what an install of exactly these versions occupies, without
downloading anything. ``--without`` drops distributions (and what only they pull in) to size a
variant, e.g. the CUDA libraries a CPU-only PyTorch does not bring. ``--env DIR`` sizes another
environment's site-packages the same way (rclip's own venv, say)::

    python benchmarks/install_size.py
    python benchmarks/install_size.py --root rclip --python /tmp/rclipenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_WALK = r"""
import importlib.metadata as md, json, re, sys
from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

root, without = sys.argv[1], {norm(n) for n in json.loads(sys.argv[2])}
dists = {norm(d.metadata["Name"]): d for d in md.distributions()}
seen, sizes, todo = set(), {}, [root]
while todo:
    name = norm(todo.pop())
    if name in seen or name in without or name not in dists:
        continue
    seen.add(name)
    dist = dists[name]
    sizes[dist.metadata["Name"]] = sum((f.size or 0) for f in (dist.files or []))
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
print(json.dumps(sizes))
"""


def closure(python: str, root: str, without: list[str]) -> dict[str, int]:
    out = subprocess.run(
        [python, "-c", _WALK, root, json.dumps(without)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def report(title: str, sizes: dict[str, int], top: int = 8) -> int:
    total = sum(sizes.values())
    print(f"\n{title}: {len(sizes)} distributions, {total / 1e6:,.0f} MB installed")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {name:32s} {size / 1e6:9,.1f} MB")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="clipsearch", help="the distribution whose closure is sized")
    ap.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    ap.add_argument("--without", nargs="*", default=None, help="distributions left out (a variant)")
    args = ap.parse_args()
    full = closure(args.python, args.root, [])
    report(f"{args.root} with everything its requirements pull in here", full)
    if args.without is None and args.root == "clipsearch":
        # the CUDA wheels PyTorch brings from PyPI on Linux; a CPU-only PyTorch has none of them
        cuda = sorted(n for n in full if n.lower().startswith(("nvidia-", "triton", "cuda-")))
        report(
            "the same without PyTorch's CUDA libraries (nvidia-*, triton, cuda-*)",
            closure(args.python, args.root, cuda),
        )
        report(
            "the same without PyTorch at all (torch, torchvision and what only they pull in)",
            closure(args.python, args.root, ["torch", "torchvision"]),
        )
    elif args.without:
        report(f"without {', '.join(args.without)}", closure(args.python, args.root, args.without))


if __name__ == "__main__":
    main()
