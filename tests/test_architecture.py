"""docs/architecture.md's module table lists exactly the package's modules, and the library's imports point only
down the chapters (model <- data <- train <- align, eval, chat, serve, convert <- build <- commands), so the reading
order holds."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "babyllama"
# a chapter may import the chapters before it (and the top-level helpers: errors, cli, files, shipped)
CHAPTERS = ["model", "data", "train", "align", "eval", "chat", "serve", "convert", "build", "commands"]


def modules() -> set[str]:
    return {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_the_module_table_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## The library, by role"):]
    listed = re.findall(r"^\| `([\w/]+)` \|", section, flags=re.M)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == modules(), f"missing {modules() - set(listed)}, stale {set(listed) - modules()}"


def test_imports_point_down_the_chapters():
    for path in PACKAGE.rglob("*.py"):
        chapter = path.relative_to(PACKAGE).parts[0]
        if chapter not in CHAPTERS:
            continue
        rank = CHAPTERS.index(chapter)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("babyllama."):
                target = node.module.split(".")[1]
                if target in CHAPTERS:
                    allowed = CHAPTERS.index(target) <= rank
                    assert allowed, f"{path.relative_to(ROOT)} imports babyllama.{target} (a later chapter)"
