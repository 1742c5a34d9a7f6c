"""The package tree keeps its layers: every import of a dkproxy module points down.

The layer map below is the one the README's "Architecture" section draws. Each row is a
layer, top first; the entries of a row are siblings that do not import each other (the SMTP
layer and mail authentication know nothing of one another). A module may import its own
component and anything in a lower row. Imports inside functions and under TYPE_CHECKING
count too: a type hint is a dependency all the same. No module imports another component's
private (underscore) names.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dkproxy"

#: (layer, its components), top first. A component is one or more modules or packages (a
#: package stands for everything below it); its members may import each other.
LAYERS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("program", (("dkproxy.__main__", "dkproxy.cli", "dkproxy.preload"),)),
    ("tools", (("dkproxy.tools",),)),
    (
        "modes",
        (
            ("dkproxy.relay",),
            (
                "dkproxy.qmail",
                "dkproxy.qmail_client",
                "dkproxy.qmail_letters",
                "dkproxy.qmail_service",
            ),
        ),
    ),
    ("processors", (("dkproxy.outbound",), ("dkproxy.inbound",))),
    ("policy", (("dkproxy.policy",),)),
    ("protocols", (("dkproxy.smtp",), ("dkproxy.mailauth",))),
    ("config", (("dkproxy.config",),)),
    ("base", (("dkproxy.daemon",), ("dkproxy.metrics",), ("dkproxy.util",), ("dkproxy",))),
)


def component_of(module: str) -> tuple[int, tuple[str, ...]]:
    """(layer index, component) of a dotted module name; KeyError when no row names it.

    The longest matching name wins; the root `dkproxy` (its __version__) matches only itself.
    """
    best: tuple[int, tuple[str, ...], str] | None = None
    for index, (_, components) in enumerate(LAYERS):
        for component in components:
            for name in component:
                if name == "dkproxy":
                    matches = module == name
                else:
                    matches = module == name or module.startswith(name + ".")
                if matches and (best is None or len(name) > len(best[2])):
                    best = (index, component, name)
    if best is None:
        raise KeyError(module)
    return best[0], best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, imported dkproxy module, names taken from it) for every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            # `from dkproxy.pkg import mod` imports the module dkproxy.pkg.mod.
            submodules = [n for n in names if _is_module(f"{target}.{n}")]
            found.extend((node.lineno, f"{target}.{n}", ()) for n in submodules)
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                found.append((node.lineno, target, rest))
    return [(line, target, names) for line, target, names in found if _ours(target)]


def _ours(module: str) -> bool:
    return module == "dkproxy" or module.startswith("dkproxy.")


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    root = PACKAGE.parent
    return (root / relative).with_suffix(".py").is_file() or (root / relative).is_dir()


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations() -> list[str]:
    found: list[str] = []
    for path in all_modules():
        source = module_name(path)
        source_layer, source_component = component_of(source)
        for line, target, names in imports_of(path):
            target_layer, target_component = component_of(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target}"
            if target_component == source_component:
                continue
            if target_layer <= source_layer:
                found.append(
                    f"{where} ({LAYERS[source_layer][0]} -> {LAYERS[target_layer][0]}: "
                    "imports only point to a lower layer)"
                )
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                found.append(f"{where}: private names {', '.join(private)} of another component")
    return found


def test_every_module_is_in_a_layer() -> None:
    unplaced = []
    for path in all_modules():
        try:
            component_of(module_name(path))
        except KeyError:
            unplaced.append(module_name(path))
    assert unplaced == [], f"add these modules to LAYERS in {__file__}: {unplaced}"


def test_imports_only_point_down() -> None:
    found = violations()
    assert found == [], "\n".join(found)


def test_readme_draws_the_same_layers() -> None:
    """The README's Architecture section names the rows of LAYERS, in the same order."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    drawing = section.split("```\n", 2)[1]
    rows = [line.split()[0] for line in drawing.splitlines() if line.strip()]
    assert rows == [name for name, _ in LAYERS]


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("dkproxy.cli", "dkproxy.outbound", True),
        ("dkproxy.relay.state", "dkproxy.outbound", True),
        ("dkproxy.qmail_service", "dkproxy.qmail_client", True),
        ("dkproxy.smtp.proxy", "dkproxy.metrics", True),
        ("dkproxy.config.values", "dkproxy.util.domains", True),
        ("dkproxy.mailauth.arc", "dkproxy.config", True),
        ("dkproxy.smtp.limits", "dkproxy.mailauth.message", False),
        ("dkproxy.mailauth.message", "dkproxy.smtp.lines", False),
        ("dkproxy.config.values", "dkproxy.mailauth.addresses", False),
        ("dkproxy.metrics", "dkproxy.smtp.proxy", False),
        ("dkproxy.relay.listener", "dkproxy.tools.keytools", False),
        ("dkproxy.outbound", "dkproxy.inbound", False),
        ("dkproxy.policy", "dkproxy.outbound", False),
        ("dkproxy.util.domains", "dkproxy.config", False),
    ],
)
def test_layer_map_decides(source: str, target: str, allowed: bool) -> None:
    """The rule itself: siblings and upward imports are refused, downward ones allowed."""
    source_layer, source_component = component_of(source)
    target_layer, target_component = component_of(target)
    decided = target_component == source_component or target_layer > source_layer
    assert decided is allowed


def test_a_wrong_import_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker reads the real files: an upward import written into a copy is found."""
    copy = tmp_path / "dkproxy"
    for path in all_modules():
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    wrong = copy / "config" / "values.py"
    wrong.write_text(
        wrong.read_text(encoding="utf-8")
        + "\n\ndef late() -> None:\n    from dkproxy.mailauth.message import Message  # noqa\n",
        encoding="utf-8",
    )
    (copy / "smtp" / "spool.py").write_text(
        "from dkproxy.config.errors import _private\n", encoding="utf-8"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    found = violations()
    assert any("config/values.py" in v and "config -> protocols" in v for v in found)
    assert any("smtp/spool.py" in v and "private names _private" in v for v in found)
    assert len(found) == 2, found
