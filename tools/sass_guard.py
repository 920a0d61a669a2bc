"""Compare the SASS of the shipped kernels at two revisions, instruction by instruction.

A refactor that should not change the kernels must leave every shipped variant's SASS as it was.
This compiles the generated sources of ``BASE`` (read from git's ``generated/`` at that revision)
and of the working tree's ``generated/``, pairs variants by their spec (minus the fields named
with ``--ignore-field``, for fields a refactor drops from the kernel identity), disassembles both
cubins of each pair for every architecture they share, and compares the instruction streams with
kernel names, addresses and encodings taken out.

    python tools/sass_guard.py --base f55b8d8 --ignore-field kv_layout

Exit status 0 when every paired variant is identical, 1 otherwise (the first differing
instructions are printed).  Compiles go through the default cubin cache, in parallel processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# One SASS instruction line of `cuobjdump -sass`: "        /*0040*/  IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;"
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*(?:/\*.*\*/)?\s*$")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def _variants_at(revision: str | None) -> list[dict]:
    """[{spec, source, kernel_name, arches}] of every shipped variant, at ``revision`` (None: the
    working tree)."""
    if revision is None:
        manifests = {path.parent.name: path.read_text() for path in (REPO / "generated").glob("*/manifest.json")}
        read = lambda recipe, name: (REPO / "generated" / recipe / name).read_text()  # noqa: E731
    else:
        names = _git("ls-tree", "--name-only", f"{revision}:generated").split()
        manifests = {name: _git("show", f"{revision}:generated/{name}/manifest.json") for name in names}
        read = lambda recipe, name: _git("show", f"{revision}:generated/{recipe}/{name}")  # noqa: E731
    variants = []
    for recipe, text in sorted(manifests.items()):
        for entry in json.loads(text)["variants"]:
            variants.append({"spec": entry["spec"], "source": read(recipe, entry["file"]),
                             "kernel_name": entry["kernel_name"], "arches": entry["arches"]})
    return variants


def _identity(spec: dict, ignored: set[str]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in ignored}, sort_keys=True)


def _instructions(job: tuple[str, str, str]) -> tuple[int, list[str]]:
    """(registers, normalised instruction lines) of one compiled variant."""
    from xqagen.compiler import compile_kernel, disassemble

    source, kernel_name, arch = job
    compiled = compile_kernel(source, kernel_name, arch, use_pch=True)
    sass = disassemble(compiled.cubin)
    lines = []
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            lines.append(match[1].replace(kernel_name, "KERNEL"))
    return compiled.resources.registers, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree's generated/ with")
    parser.add_argument("--ignore-field", action="append", default=[],
                        help="spec field left out when pairing variants (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    ignored = set(args.ignore_field)

    base = {}
    for variant in _variants_at(args.base):
        base.setdefault(_identity(variant["spec"], ignored), variant)  # duplicates differ only in ignored fields
    head = {_identity(v["spec"], ignored): v for v in _variants_at(None)}
    unpaired = sorted(set(base) ^ set(head))
    for key in unpaired:
        print(f"unpaired ({'base' if key in base else 'head'} only): {key}")

    pairs = [(key, arch) for key in sorted(set(base) & set(head))
             for arch in base[key]["arches"] if arch in head[key]["arches"]]
    jobs = [(side[key]["source"], side[key]["kernel_name"], arch) for key, arch in pairs for side in (base, head)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        listings = list(pool.map(_instructions, jobs))

    differing = 0
    for index, (key, arch) in enumerate(pairs):
        (old_regs, old), (new_regs, new) = listings[2 * index], listings[2 * index + 1]
        name = f"{head[key]['kernel_name']} {arch}"
        if old == new:
            print(f"identical  {len(new):6d} instructions, {new_regs} registers  {name}")
            continue
        differing += 1
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        print(f"DIFFERENT  {len(old)} -> {len(new)} instructions, {old_regs} -> {new_regs} registers, "
              f"first at {first}  {name}")
        for i in range(first, min(first + 3, max(len(old), len(new)))):
            print(f"    base: {old[i] if i < len(old) else '-'}\n    head: {new[i] if i < len(new) else '-'}")
    print(f"{len(pairs)} (variant, arch) pairs: {len(pairs) - differing} identical, {differing} different; "
          f"{len(unpaired)} unpaired variants")
    return 1 if differing or unpaired else 0


if __name__ == "__main__":
    sys.exit(main())
