#!/usr/bin/env python3
"""Generates the table of Meraki Dashboard API operations (src/endpoints/meraki-api-v1.tsv).

The source of truth is the official `meraki` Python SDK imported by the interpreter that runs
this script: every operation of its synchronous API modules (meraki/api/*.py) is read with `ast`,
never executed. For each operation the SDK writes

    metadata = {"tags": ["organizations", "configure"], "operation": "getOrganizationNetworks"}
    resource = f"/organizations/{organizationId}/networks"
    return self._session.get_pages(metadata, resource, params, ...)

and the table keeps the HTTP method, the path template as the SDK spells it, the operationId and
the tags. A fifth column, `scope`, is the OAuth scope Meraki's public API index says the operation
requires (data/meraki-api-oauth-scopes.tsv, joined by operationId; empty when the index lists none
or does not have the operation). When the SDK and the index disagree on an operation's method or
path, the script stops: one of them changed, and the join would be wrong. The asynchronous (meraki/aio/api) and action-batch (meraki/api/batch) modules repeat
the same operations; they are read too, only to add what the synchronous modules lack.

To regenerate for another SDK release, install it and run:

    python -m pip install meraki==X.Y.Z
    python scripts/gen-endpoint-table.py --output src/endpoints/meraki-api-v1.tsv

For a new API index, replace data/meraki-api-oauth-scopes.tsv (same columns) and run it again.

`--check FILE` exits 1 when FILE differs from what would be generated. Anything the script cannot
understand in the SDK's source is a fatal error, so a changed SDK layout is noticed rather than
silently dropping operations. Warnings (duplicates, surprises) go to standard error.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import meraki

SCRIPT = "scripts/gen-endpoint-table.py"
SCOPES = Path(__file__).resolve().parent.parent / "data" / "meraki-api-oauth-scopes.tsv"
SCOPES_HEADER = ["operationId", "method", "path", "releaseStage", "oauthScope"]

# The session's request helpers and the HTTP method each sends.
SESSION_METHODS = {
    "get": "GET",
    "get_pages": "GET",
    "post": "POST",
    "put": "PUT",
    "delete": "DELETE",
}

# How an action-batch action maps to HTTP; other actions ("claim", "swap", ...) are POSTs.
BATCH_METHODS = {"create": "POST", "update": "PUT", "destroy": "DELETE", "delete": "DELETE"}


class SdkLayoutError(Exception):
    """The SDK's source does not have the shape this script understands."""


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation: str
    tags: tuple[str, ...]
    origin: str  # file:line, for messages
    scope: str = ""

    def row(self) -> str:
        return "\t".join((self.method, self.path, self.operation, ",".join(self.tags), self.scope))


def warn(message: str) -> None:
    print(f"gen-endpoint-table: {message}", file=sys.stderr)


def template(node: ast.expr, where: str) -> str:
    """The path template of a `resource = ...` value, with `{name}` for each substitution."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        raise SdkLayoutError(f"{where}: resource is not a string or f-string")
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            parts.append(value.value)
        elif (
            isinstance(value, ast.FormattedValue)
            and isinstance(value.value, ast.Name)
            and value.conversion == -1
            and value.format_spec is None
        ):
            parts.append("{" + value.value.id + "}")
        else:
            raise SdkLayoutError(f"{where}: resource substitutes something other than a name")
    return "".join(parts)


def literal_metadata(node: ast.expr, where: str) -> tuple[str, tuple[str, ...]]:
    """operationId and tags from a `metadata = {...}` dict literal."""
    try:
        metadata = ast.literal_eval(node)
    except ValueError as err:
        raise SdkLayoutError(f"{where}: metadata is not a literal: {err}") from None
    operation = metadata.get("operation") if isinstance(metadata, dict) else None
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    if not isinstance(operation, str) or not operation:
        raise SdkLayoutError(f"{where}: metadata has no operation")
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
        raise SdkLayoutError(f"{where}: metadata has no tags")
    return operation, tuple(tags)


def assignments(function: ast.FunctionDef, name: str) -> list[ast.Assign]:
    return [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == name
    ]


def session_calls(function: ast.FunctionDef) -> list[ast.Call]:
    """Calls of `self._session.<helper>(...)` for the request helpers."""
    return [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SESSION_METHODS
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "_session"
        and isinstance(node.func.value.value, ast.Name)
        and node.func.value.value.id == "self"
    ]


def methods(tree: ast.Module):
    """Public methods of the module's classes."""
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            for function in cls.body:
                is_method = isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                if is_method and not function.name.startswith("_"):
                    yield function


def only(nodes: list, what: str, where: str):
    if len(nodes) != 1:
        raise SdkLayoutError(f"{where}: expected one {what}, found {len(nodes)}")
    return nodes[0]


def check_placeholders(function: ast.FunctionDef, path: str, where: str) -> None:
    """Each `{name}` in the path is one of the function's parameters."""
    arguments = {a.arg for a in function.args.args + function.args.kwonlyargs}
    for segment in path.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            if segment[1:-1] not in arguments:
                warn(f"{where}: path parameter {segment} is not an argument of {function.name}")
        elif "{" in segment or "}" in segment:
            raise SdkLayoutError(f"{where}: a path segment mixes text and a parameter: {path}")


def session_operations(path: Path, root: Path) -> list[Operation]:
    """The operations of an API module whose methods call the session (api/*.py, aio/api/*.py)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for function in methods(tree):
        where = f"{path.relative_to(root)}:{function.lineno}"
        metadata = only(assignments(function, "metadata"), "metadata assignment", where)
        resource = only(assignments(function, "resource"), "resource assignment", where)
        call = only(session_calls(function), "self._session request", where)
        args = [a.id if isinstance(a, ast.Name) else None for a in call.args[:2]]
        if args != ["metadata", "resource"]:
            raise SdkLayoutError(f"{where}: the request is not sent with (metadata, resource, ...)")
        operation, tags = literal_metadata(metadata.value, where)
        if operation != function.name:
            warn(f"{where}: method {function.name} sends operation {operation}")
        route = template(resource.value, where)
        check_placeholders(function, route, where)
        # Tabs and newlines separate the table's fields and rows, commas its tags.
        for field in (route, operation, *tags):
            if any(c.isspace() or c == "," for c in field):
                raise SdkLayoutError(f"{where}: {field!r} has a space or comma")
        found.append(Operation(SESSION_METHODS[call.func.attr], route, operation, tags, where))
    return found


def batch_actions(path: Path, root: Path) -> list[tuple[str, str, str, str]]:
    """(method, path, operationId, origin) of an action-batch module; it carries no tags."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for function in methods(tree):
        where = f"{path.relative_to(root)}:{function.lineno}"
        resource = only(assignments(function, "resource"), "resource assignment", where)
        action = only(assignments(function, "action"), "action assignment", where)
        if not isinstance(action.value, ast.Dict):
            raise SdkLayoutError(f"{where}: action is not a dict literal")
        kind = None
        for key, value in zip(action.value.keys, action.value.values, strict=True):
            is_operation = isinstance(key, ast.Constant) and key.value == "operation"
            if is_operation and isinstance(value, ast.Constant) and isinstance(value.value, str):
                kind = value.value
        if kind is None:
            raise SdkLayoutError(f"{where}: action has no literal operation")
        method = BATCH_METHODS.get(kind, "POST")
        found.append((method, template(resource.value, where), function.name, where))
    return found


def modules(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if p.name != "__init__.py")


def collect(package: Path) -> list[Operation]:
    """Every operation of the SDK, without repeats, in no particular order."""
    root = package.parent
    operations = []
    for module in modules(package / "api"):
        operations.extend(session_operations(module, root))
    if not operations:
        raise SdkLayoutError(f"no operations found under {package / 'api'}")

    # The async and batch modules are generated from the same spec; they only count if they add.
    known = {(op.method, op.path, op.operation) for op in operations}
    known_ids = {op.operation for op in operations}
    for module in modules(package / "aio" / "api"):
        for op in session_operations(module, root):
            if (op.method, op.path, op.operation) not in known:
                warn(f"{op.origin}: {op.operation} is only in the async modules; kept")
                known.add((op.method, op.path, op.operation))
                known_ids.add(op.operation)
                operations.append(op)
    for module in modules(package / "api" / "batch"):
        for method, route, operation, where in batch_actions(module, root):
            if operation not in known_ids:
                # Without metadata its tags are unknown, so it cannot be tabled faithfully.
                warn(f"{where}: {method} {route} ({operation}) is only a batch action; left out")
    return operations


def shape(path: str) -> str:
    """The path with every parameter unnamed: two paths of one shape match the same requests."""
    return "/".join("{}" if s.startswith("{") else s for s in path.split("/"))


def deduplicate(operations: list[Operation]) -> list[Operation]:
    """One operation per (method, path shape); the smallest operationId wins, deterministically.

    Paths that differ only in a parameter's name match the same requests, so they count as one.
    """
    by_route: dict[tuple[str, str], list[Operation]] = {}
    for op in operations:
        by_route.setdefault((op.method, shape(op.path)), []).append(op)
    kept = []
    for (method, _), group in sorted(by_route.items()):
        group.sort(key=lambda op: (op.operation, op.path, op.tags))
        distinct = {(op.path, op.operation, op.tags) for op in group}
        if len(distinct) > 1:
            names = ", ".join(f"{op.operation} {op.path} ({op.origin})" for op in group)
            warn(f"duplicate {method} route: {names}; kept {group[0].operation}")
        kept.append(group[0])

    # The table is looked up by operationId too (EndpointTable::by_operation_id), which refuses
    # a table where one id names two routes: fail here rather than write such a table.
    by_id: dict[str, list[Operation]] = {}
    for op in kept:
        by_id.setdefault(op.operation, []).append(op)
    for operation, group in sorted(by_id.items()):
        if len(group) > 1:
            routes = ", ".join(f"{op.method} {op.path} ({op.origin})" for op in group)
            raise SdkLayoutError(f"operationId {operation} names several routes: {routes}")
    return kept


def read_scopes(path: Path) -> dict[str, tuple[str, str, str]]:
    """operationId -> (method, path, scope) of Meraki's API index table."""
    index: dict[str, tuple[str, str, str]] = {}
    header_seen = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if not header_seen:
            if fields != SCOPES_HEADER:
                raise SdkLayoutError(f"{path}:{number}: expected the header {SCOPES_HEADER}")
            header_seen = True
            continue
        if len(fields) != len(SCOPES_HEADER):
            raise SdkLayoutError(f"{path}:{number}: expected {len(SCOPES_HEADER)} fields")
        operation, method, route, _stage, scope = fields
        if operation in index:
            raise SdkLayoutError(f"{path}:{number}: operationId {operation} is listed twice")
        index[operation] = (method.upper(), route, scope)
    if not index:
        raise SdkLayoutError(f"{path}: no operations")
    return index


def join_scopes(operations: list[Operation], index: dict[str, tuple[str, str, str]]) -> list[Operation]:
    """Each operation with the scope the index gives it; a method or path disagreement is fatal."""
    joined = []
    for op in operations:
        method, route, scope = index.get(op.operation, (op.method, op.path, ""))
        if method != op.method or shape(route) != shape(op.path):
            raise SdkLayoutError(
                f"{op.operation}: the SDK says {op.method} {op.path} ({op.origin}), "
                f"Meraki's API index {method} {route}"
            )
        joined.append(Operation(op.method, op.path, op.operation, op.tags, op.origin, scope))
    return joined


def render(operations: list[Operation], version: str) -> str:
    rows = sorted(operations, key=lambda op: (op.path, op.method))
    lines = [
        f"# meraki-sdk {version} {len(rows)} operations generated by {SCRIPT}",
        "method\tpath\toperation\ttags\tscope",
    ]
    lines.extend(op.row() for op in rows)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", type=Path, help="write the table here (default: stdout)")
    out.add_argument("--check", type=Path, help="exit 1 if this file is not the generated table")
    parser.add_argument(
        "--scopes", type=Path, default=SCOPES, help=f"Meraki's API index table (default: {SCOPES})"
    )
    args = parser.parse_args()

    package = Path(meraki.__file__).resolve().parent
    try:
        operations = join_scopes(deduplicate(collect(package)), read_scopes(args.scopes))
    except SdkLayoutError as err:
        print(
            f"gen-endpoint-table: cannot read meraki {meraki.__version__}: {err}", file=sys.stderr
        )
        return 2
    table = render(operations, meraki.__version__)

    if args.check:
        current = args.check.read_text(encoding="utf-8") if args.check.exists() else ""
        if current != table:
            warn(f"{args.check} is not the table for meraki {meraki.__version__}; regenerate it")
            return 1
    elif args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table, encoding="utf-8")
    else:
        sys.stdout.write(table)
    scoped = sum(1 for op in operations if op.scope)
    warn(f"meraki {meraki.__version__}: {len(operations)} operations, {scoped} with a scope")
    return 0


if __name__ == "__main__":
    sys.exit(main())
