"""The library's structural rules (issue 11), checked by reading its source.

Rules, as enforced here:

- Imports: the graph of module-level imports inside ``imgcluster/`` is acyclic. An edge is an
  ``import``/``from ... import`` at module level (also inside a module-level ``if``/``try``),
  except under ``if TYPE_CHECKING:``; a lazy import inside a function is deliberate (it keeps
  ``import imgcluster`` fast, or defers an optional dependency) and runs after both modules
  exist, so it is no edge. ``from pkg import submodule`` is an edge to the submodule only;
  importing a submodule is never an edge to its package's ``__init__`` (Python runs that
  first anyway).
- Nothing in ``imgcluster/`` imports streamlit, at any level; only ``imgcluster/distributed/``
  imports ray.
- SQL: every SQL string literal of a module names only the tables its module owns (`OWNERS`),
  the published read-only views (`PUBLISHED_VIEWS`) or, for the schema-level modules, SQLite's
  own ``sqlite_master``. `imgcluster.migrations` builds every table (DDL only) and may name all.
- Errors: every exception raised on purpose derives from `ImgclusterError`; the few others are
  listed in `OTHER_RAISES`, each with why.
- The app's choosers: a keyed ``selectbox`` / ``multiselect`` / ``radio`` with a
  ``format_func`` keys on its option texts (`imgcluster_app.common.choice_key`) or is listed in
  `STABLE_CHOOSERS` with why its texts cannot change while it is shown.
"""

from __future__ import annotations

import ast
import importlib
import re
import typing
from pathlib import Path

from imgcluster.errors import ImgclusterError

ROOT = Path(__file__).resolve().parents[1] / "imgcluster"

LABEL_TABLES = ("label_sessions", "labels", "image_labels", "audit_log")

#: Table -> the modules that may name it in SQL (a name ending in "." is a package prefix).
OWNERS: dict[str, tuple[str, ...]] = {
    # workspace owns the store's own rows; images (ingest) writes the images table it fills.
    "meta": ("imgcluster.workspace",),
    "images": ("imgcluster.workspace", "imgcluster.images"),
    "feature_shards": ("imgcluster.features.store",),
    "features": ("imgcluster.features.store",),
    "clusterings": ("imgcluster.runs",),
    "assignments": ("imgcluster.runs",),
    "projections": ("imgcluster.spaces",),
    **dict.fromkeys(LABEL_TABLES, ("imgcluster.labels.",)),
    "sqlite_master": ("imgcluster.workspace", "imgcluster.migrations", "imgcluster.check"),
}

#: Read-only views a module publishes for others to join (created in `MIGRATIONS`).
PUBLISHED_VIEWS = {"image_catalog": "imgcluster.workspace"}

SCHEMA_MODULE = "imgcluster.migrations"

#: (module, table) pairs still to move to a published view, with who moves them. The test
#: fails when one is fixed, so the list only shrinks.
SQL_PENDING: set[tuple[str, str]] = set()

#: (module, raised name) -> why it need not be an ImgclusterError.
OTHER_RAISES: dict[tuple[str, str], str] = {
    ("imgcluster.cli", "click.ClickException"): "the CLI's way to exit 1 with one line",
    ("imgcluster.cli", "click.BadParameter"): "the CLI's way to exit 2 on a bad option",
    ("imgcluster.backbones.torch_legacy", "ValueError"): "parse error, re-raised as InvalidWeights",
    ("imgcluster.backbones.torch_legacy", "pickle.UnpicklingError"): "likewise",
    ("imgcluster.backbones.torch_legacy", "EOFError"): "likewise",
    ("imgcluster.export.files", "_Refused"): "private control flow, caught in the module",
    ("imgcluster.export.formats", "ValueError"): "Pillow-like decode failure; caller reports it",
    ("imgcluster._process", "ValueError"): "programmer error: fileno() of a released lock",
    ("imgcluster.backbones.efficientnet_lite", "AssertionError"): "unreachable branch",
    ("imgcluster.spaces", "AttributeError"): "module __getattr__ protocol (PEP 562)",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run at import: the body, and inside module-level if/try blocks
    (but not ``if TYPE_CHECKING:``)."""
    out, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                stack += handler.body
    return out


def _imported(name: str, is_pkg: bool, nodes: typing.Iterable[ast.AST]) -> set[str]:
    """Every module (dotted, absolute) the import statements among ``nodes`` name."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in MODULES else source)
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, (path, is_pkg) in MODULES.items():
        found = _imported(name, is_pkg, _module_level(_tree(path)))
        graph[name] = {m for m in found if m in MODULES and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_library() -> None:
    graph = import_graph()
    assert "imgcluster.clustering" in graph["imgcluster"]  # the graph is really built
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_library_never_imports_streamlit_and_only_distributed_imports_ray() -> None:
    offenders = []
    for name, (path, is_pkg) in MODULES.items():
        roots = {m.split(".")[0] for m in _imported(name, is_pkg, ast.walk(_tree(path)))}
        if "streamlit" in roots:
            offenders.append(f"{name} imports streamlit")
        if "ray" in roots and not name.startswith("imgcluster.distributed"):
            offenders.append(f"{name} imports ray outside imgcluster.distributed")
    assert offenders == []
    assert any(  # the check sees ray where it is used
        "ray" in _imported(n, p, ast.walk(_tree(f)))
        for n, (f, p) in MODULES.items()
        if n.startswith("imgcluster.distributed")
    )


# -- SQL ownership ---------------------------------------------------------------------------

_SQL_START = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH|REPLACE|FROM|JOIN)\b"
)
_TABLE_REF = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|VIEW|REFERENCES|INDEX\s+\w+\s+ON)"
    r"(?:\s+IF\s+(?:NOT\s+)?EXISTS)?\s+([A-Za-z_]\w*)"
)
_NOT_TABLES = {"SET", "SELECT", "VALUES", "OR", "IF", "WHERE"}


def sql_tables(text: str) -> set[str]:
    """Table (or view) names an SQL string reads or writes."""
    if not _SQL_START.search(text):
        return set()
    return {t for t in _TABLE_REF.findall(text) if t.upper() not in _NOT_TABLES}


def _string_literals(tree: ast.Module) -> typing.Iterator[str]:
    """Every string literal, an f-string as its constant parts; docstrings left out."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_fstrings = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in node.values
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield " ".join(
                p.value if isinstance(p, ast.Constant) else "x"
                for p in node.values
                if isinstance(p, ast.Constant | ast.FormattedValue)
            )
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | in_fstrings
        ):
            yield node.value


def _may_name(module: str, table: str) -> bool:
    if module == SCHEMA_MODULE or table in PUBLISHED_VIEWS:
        return True
    owners = OWNERS.get(table, ())
    return any(module == o or (o.endswith(".") and module.startswith(o)) for o in owners)


def sql_violations() -> set[tuple[str, str]]:
    out = set()
    for name, (path, _) in MODULES.items():
        for text in _string_literals(_tree(path)):
            out |= {(name, t) for t in sql_tables(text) if not _may_name(name, t)}
    return out


def test_sql_table_names_are_found() -> None:
    assert sql_tables("SELECT a FROM images AS i JOIN labels AS l ON l.id = i.id") == {
        "images",
        "labels",
    }
    assert sql_tables("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT DO UPDATE SET") == {
        "meta"
    }
    assert sql_tables("CREATE INDEX x ON features(shard_id)") == {"features"}
    assert sql_tables("the images come from the workspace") == set()


def test_every_table_has_an_owner_and_every_view_is_built() -> None:
    from imgcluster.migrations import MIGRATIONS

    built = set()
    for _name, sql in MIGRATIONS:
        built |= set(re.findall(r"CREATE (?:TABLE|VIEW) (\w+)", sql))
        built -= set(re.findall(r"DROP (?:TABLE|VIEW) (\w+)", sql))
    assert built == set(OWNERS) - {"sqlite_master"} | set(PUBLISHED_VIEWS)


def test_no_sql_on_a_table_outside_its_owner() -> None:
    found = sql_violations()
    assert found - SQL_PENDING == set(), "read these through the owner or a published view"
    assert found >= SQL_PENDING, f"fixed, remove from SQL_PENDING: {SQL_PENDING - found}"


# -- errors ----------------------------------------------------------------------------------


def _resolve(module: object, tree: ast.Module, dotted: str) -> object:
    """What a raised name means in its module, including names imported inside functions."""
    head, _, rest = dotted.partition(".")
    namespace = dict(vars(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == head and head not in namespace:
                    source = importlib.import_module(node.module)
                    namespace[head] = getattr(source, alias.name, None)
    obj = namespace.get(head, getattr(__builtins__, head, None))
    if obj is None and isinstance(__builtins__, dict):
        obj = __builtins__.get(head)
    for attr in rest.split(".") if rest else ():
        obj = getattr(obj, attr, None)
    return obj


def _is_library_error(obj: object) -> bool:
    if isinstance(obj, type):
        return issubclass(obj, ImgclusterError)
    if callable(obj):  # a factory such as `workspace.sqlite_error`: check what it returns
        returned = typing.get_type_hints(obj).get("return")
        return isinstance(returned, type) and issubclass(returned, ImgclusterError)
    return False


def raised_outside_the_hierarchy() -> set[tuple[str, str]]:
    out = set()
    for name, (path, _) in MODULES.items():
        tree = _tree(path)
        module = importlib.import_module(name)
        for node in ast.walk(tree):
            # `raise` and `raise exc` re-raise something caught; only `raise X(...)` is new
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                dotted = ast.unparse(node.exc.func)
                if not _is_library_error(_resolve(module, tree, dotted)):
                    out.add((name, dotted))
    return out


def test_every_exception_raised_on_purpose_is_an_imgcluster_error() -> None:
    found = raised_outside_the_hierarchy()
    assert found - set(OTHER_RAISES) == set()
    assert set(OTHER_RAISES) <= found, f"gone, remove: {set(OTHER_RAISES) - found}"


def test_a_missing_label_is_a_label_error_not_a_cluster_error() -> None:
    from imgcluster.errors import UnknownCluster, UnknownLabel

    assert issubclass(UnknownLabel, ImgclusterError)
    assert not issubclass(UnknownLabel, UnknownCluster)


# -- names -----------------------------------------------------------------------------------

#: Old parameter name -> the one name the library uses (issue 11).
RENAMED = {"seed": "random_state", "ws": "workspace"}


def test_library_parameters_use_one_name_for_random_state_and_workspace() -> None:
    found = []
    for name, (path, _) in MODULES.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                for arg in args.posonlyargs + args.args + args.kwonlyargs:
                    if arg.arg in RENAMED:
                        found.append(f"{name}.{node.name}({arg.arg}=): say {RENAMED[arg.arg]}")
    assert found == []


# -- the app's choosers ------------------------------------------------------------------------

APP = ROOT.parent
#: Choosers whose option texts never change while shown (so a key without them is safe).
STABLE_CHOOSERS = {
    ("pages/start.py", "'start_open_pick'"): "workspace folders, shown by name",
    ("pages/export.py", "'export_split'"): "constant texts",
    ("pages/export.py", "'export_mode'"): "constant texts",
    ("pages/features.py", "f'{common.VIEW_PREFIX}features_backbone'"): (
        "a feature set's name and description, never its progress"
    ),
    ("pages/label.py", "'label_merge_with'"): (
        "names change only by a rename, which bumps the version the merge expects: it refuses"
    ),
}


def _keyed_choosers(tree: ast.AST) -> list[tuple[int, ast.expr]]:
    """``(line, key expression)`` of every keyed ``selectbox`` / ``multiselect`` / ``radio``
    call with a ``format_func``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr not in ("selectbox", "multiselect", "radio"):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        if "format_func" in kwargs and "key" in kwargs:
            found.append((node.lineno, kwargs["key"]))
    return found


def _is_choice_key(expr: ast.expr, tree: ast.AST) -> bool:
    """A ``choice_key(...)`` call, or a name assigned from one in the same module."""

    def call(e: ast.expr) -> bool:
        return isinstance(e, ast.Call) and getattr(e.func, "attr", getattr(e.func, "id", "")) == (
            "choice_key"
        )

    if call(expr):
        return True
    if isinstance(expr, ast.Name):
        return any(
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)
            and call(n.value)
            for n in ast.walk(tree)
        )
    return False


def test_keyed_choosers_with_formatted_options_key_on_their_texts() -> None:
    """Streamlit keeps a chooser's value as the text it shows. When that text changes (a count
    after a move, a rename) the next run gets the stale text back instead of the option: the
    Label page jumped to its first label on the first click after any move. A keyed chooser
    with a ``format_func`` must therefore key on its texts (`common.choice_key`), or be listed
    in `STABLE_CHOOSERS` with why its texts cannot change."""
    offenders = []
    files = [*APP.joinpath("pages").glob("*.py"), *APP.joinpath("imgcluster_app").glob("*.py")]
    files.append(APP / "app.py")
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(APP).as_posix()
        for line, key in _keyed_choosers(tree):
            if (rel, ast.unparse(key)) in STABLE_CHOOSERS or _is_choice_key(key, tree):
                continue
            offenders.append(f"{rel}:{line}")
    assert not offenders, f"keyed choosers with formatted options not on choice_key: {offenders}"


def test_the_chooser_check_finds_a_bare_key() -> None:
    tree = ast.parse(
        "st.selectbox('L', ids, format_func=str, key='x')\n"
        "k = common.choice_key('y', texts)\n"
        "st.selectbox('L', ids, format_func=str, key=k)\n"
    )
    keys = _keyed_choosers(tree)
    assert [_is_choice_key(k, tree) for _line, k in keys] == [False, True]
