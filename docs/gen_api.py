"""Generate docs/api.md, the API reference of msar's public names, from their docstrings.

Run from the repository root after changing a public signature or docstring::

    python docs/gen_api.py            # rewrites docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date (for CI)

Public names are those in ``__all__`` of ``msar``, ``msar.training`` and ``msar.testing``, and the
functions and classes of ``msar.sampling`` (the sampler's steps), ``msar.editing`` and ``msar.metrics``.
For classes, the constructor signature and every public method or property defined
by the class itself (not inherited from ``torch.nn.Module``) are listed.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys

# the checkout this script lives in, not whichever msar is installed (sys.path[0] is docs/)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODULES = ["msar", "msar.sampling", "msar.editing", "msar.metrics", "msar.text", "msar.training", "msar.testing"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    # Sphinx roles read fine as code in Markdown: :class:`~msar.x.Y` -> `Y`
    doc = re.sub(r":(?:class|func|meth|mod|attr|data):`~?([\w.]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", doc)
    doc = doc.replace("``", "`")
    # indented literal blocks after "::" become fenced code
    out, lines, i = [], doc.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines):
            out.append(line.rstrip()[:-1] if not line.rstrip().endswith(" ::") else line.rstrip()[:-3])
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            out += ["", "```python", *block, "```", ""]
            continue
        out.append(line)
        i += 1
    return _sections("\n".join(out).strip())


SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Yields|Attributes):\s*$")


def _sections(doc: str) -> str:
    """Google-style `Args:` blocks -> a bold title and one bullet per argument."""
    out, in_sec, in_code = [], False, False
    for line in doc.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith("```"):
            out.append(line)
            continue
        m = SECTION.match(line)
        if m:
            out += ["", f"**{m.group(1)}**", ""]
            in_sec = True
            continue
        if in_sec and line.startswith("    ") and not line.startswith("        "):
            item = line.strip()
            head, sep, rest = item.partition(": ")
            out.append(f"- `{head}`: {rest}" if sep and len(head) < 40 else f"- {item}")
            continue
        if in_sec and line.startswith("        "):
            out[-1] += " " + line.strip()
            continue
        if line.strip():
            in_sec = False if not line.startswith(" ") else in_sec
        out.append(line)
    return "\n".join(out)


def _repr(v) -> str:
    # sets print in hash order, which changes between runs: sort them for a stable file
    return f"{type(v).__name__}({sorted(v)!r})" if isinstance(v, (set, frozenset)) else repr(v)


def _ann(a) -> str:
    # annotations are strings under `from __future__ import annotations`: print them bare
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _sig(obj, name: str, drop_first: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params, star_done = [], False
    plist = list(sig.parameters.values())[1 if drop_first else 0:]
    for p in plist:
        if p.kind == p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        if p.kind == p.VAR_POSITIONAL:
            star_done = True
        text = ("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name
        if p.annotation is not p.empty:
            text += f": {_ann(p.annotation)}"
        if p.default is not p.empty:
            default = re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"\1", _repr(p.default))
            text += f" = {default}" if p.annotation is not p.empty else f"={default}"
        params.append(text)
    ret = f" -> {_ann(sig.return_annotation)}" if sig.return_annotation is not sig.empty else ""
    return f"{name}({', '.join(params)}){ret}"


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") or name in ("training", "dump_patches", "call_super_init"):
            continue
        if isinstance(value, property) or inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod)):
            out.append((name, value))
    return out


def _render_class(qual: str, cls) -> list[str]:
    lines = [f"### `{qual}`", "", "```python", _sig(cls, f"class {cls.__name__}").removesuffix(" -> None"), "```", "", _doc(cls), ""]
    if "__init__" not in cls.__dict__ and not dataclasses.is_dataclass(cls):
        lines[3] = f"class {cls.__name__}"
    if dataclasses.is_dataclass(cls):
        fields = [f"`{f.name}`" for f in dataclasses.fields(cls)]
        lines += [f"Fields: {', '.join(fields)}.", ""]
    for name, value in _members(cls):
        if isinstance(value, property):
            doc = _doc(value.fget) if value.fget else ""
            lines += [f"- **`{name}`** (property){': ' + doc.splitlines()[0] if doc else ''}"]
            continue
        fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        doc = _doc(fn)
        if not doc:
            continue  # undocumented helpers (overrides of protocol methods are documented on the protocol)
        prefix = "classmethod " if isinstance(value, classmethod) else ""
        body = doc.replace("\n", "\n  ")
        lines += [f"- **`{prefix}{_sig(fn, name, drop_first=not isinstance(value, staticmethod))}`**", "", f"  {body}", ""]
    return lines + [""]


def render() -> str:
    parts = ["# API reference", "",
             "Generated by `python docs/gen_api.py` from the docstrings; do not edit by hand.",
             "Shapes: `B` batch, `K` scales, `n_k` tokens of scale k, `L = sum n_k`, `C` latent dim, `V` vocabulary.", ""]
    toc = []
    body = []
    for modname in MODULES:
        mod = importlib.import_module(modname)
        names = list(getattr(mod, "__all__", None) or [  # no __all__: the functions and classes defined there
            n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None) == modname
            and (inspect.isfunction(v) or inspect.isclass(v))])
        toc.append(f"- [`{modname}`](#{modname.replace('.', '')}): " + ", ".join(f"`{n}`" for n in names))
        body += [f"## `{modname}`", "", _doc(mod).split("\n\n")[0], ""]
        for name in names:
            obj = getattr(mod, name)
            qual = f"{modname}.{name}"
            if inspect.isclass(obj):
                body += _render_class(qual, obj)
            elif callable(obj):
                body += [f"### `{qual}`", "", "```python", _sig(obj, name), "```", "", _doc(obj), "", ""]
            else:
                body += [f"### `{qual}`", "", f"`{name} = {_repr(obj)}`", "", ""]
    text = "\n".join(parts + toc + [""] + body)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if docs/api.md differs from the docstrings")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
