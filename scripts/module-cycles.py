#!/usr/bin/env python3
"""Fails when the top-level modules of any crate import each other in a cycle.

Each crate's top-level modules are the files and folders under src/ (lib.rs and main.rs
excluded); a module's references to `crate::<module>` (in `use` lines and in paths, comments
skipped) are its edges. comb-datapath's own unit test (module_graph) also checks its layering.
"""
import re
import sys
from pathlib import Path

REF = re.compile(r"crate::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def references(text):
    out = set()
    for line in text.splitlines():
        code = line.split("//")[0]
        for m in REF.finditer(code):
            g = m.group(1)
            if g.startswith("{"):
                for item in g[1:-1].split(","):
                    name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", item)
                    if name:
                        out.add(name.group(1))
            else:
                out.add(g)
    return out


def crate_graph(src):
    modules = {}
    for p in src.iterdir():
        if p.is_dir():
            files = list(p.rglob("*.rs"))
        elif p.suffix == ".rs" and p.stem not in ("lib", "main"):
            files = [p]
            extra = src / p.stem
            if extra.is_dir():
                files += list(extra.rglob("*.rs"))
        else:
            continue
        modules.setdefault(p.stem, set()).update(
            r for f in files for r in references(f.read_text())
        )
    return {m: {r for r in refs if r in modules and r != m} for m, refs in modules.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def main(root):
    bad = 0
    crates = sorted(p for p in (root / "crates").iterdir() if (p / "src").is_dir())
    for crate in crates:
        cycle = find_cycle(crate_graph(crate / "src"))
        if cycle:
            print(f"{crate.name}: import cycle {' -> '.join(cycle)}", file=sys.stderr)
            bad += 1
    if bad:
        return 1
    print(f"module-cycles: {len(crates)} crates, no import cycle between top-level modules")
    return 0


def self_test():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"], find_cycle(g)
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert references("use crate::{x, y::Z};\n// crate::no\nlet v = crate::w::f();") == {"x", "y", "w"}


if __name__ == "__main__":
    self_test()
    sys.exit(main(Path(__file__).resolve().parent.parent))
