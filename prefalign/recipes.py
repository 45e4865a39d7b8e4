"""Bounds on the YAML prefalign reads from users (recipes, files given as option values, values on the command line):
size, nesting and alias expansion are checked before any Python object is built."""

from __future__ import annotations

import os
import stat

import yaml
from jsonargparse import Path, get_loader, set_loader

MAX_BYTES = 1 << 20
"""A recipe is a few KiB of YAML: a file over 1 MiB is refused after reading that much."""
MAX_NODES = 100_000
"""Scalars, lists and mappings of one YAML text with every alias expanded (a recipe has a few hundred). Aliases
share nodes when loaded, but jsonargparse copies and walks the tree: nine nested lists of nine aliases, a 300-byte
"billion laughs", would take gigabytes and minutes."""
MAX_DEPTH = 64
"""Nesting of lists and mappings (a recipe's is under 10); deeper would overflow Python's recursion later."""


class RecipeError(ValueError, TypeError):
    """A recipe, or YAML given as an option's value, refused before it is loaded."""


def check_yaml(text: str, source: str) -> None:
    """Refuse YAML that expands to more than :data:`MAX_NODES` nodes, nests deeper than :data:`MAX_DEPTH`, or holds
    an alias inside the node it names (a cycle). Linear in the text: it reads the parser's events and builds nothing.
    A syntax error is raised as PyYAML's ``YAMLError``."""
    expanded: dict[str, int] = {}  # anchor -> its node's size with aliases expanded
    open_nodes: list[list] = [[None, 0]]  # [anchor, size so far] of each unfinished list/mapping, the stream first
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(open_nodes) > MAX_DEPTH:
                raise RecipeError(f"{source}: YAML nested deeper than {MAX_DEPTH} levels: refused")
            open_nodes.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            if any(event.anchor == node[0] for node in open_nodes):
                raise RecipeError(f"{source}: YAML alias *{event.anchor} inside the node it names (a cycle): refused")
            anchor, size = None, expanded.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            expanded[anchor] = size
        open_nodes[-1][1] += size
        if open_nodes[-1][1] > MAX_NODES:
            raise RecipeError(
                f"{source}: YAML of over {MAX_NODES} nodes, each alias (*name) counted as the node it repeats "
                "(an alias bomb?): refused"
            )


def read_recipe_file(path: str) -> str:
    """The text of a YAML file a user gave: a regular file (a FIFO or device would block or never end) of at most
    :data:`MAX_BYTES` of UTF-8, within the bounds of :func:`check_yaml`."""
    # O_NONBLOCK: a FIFO opens at once, without waiting for a writer, and is refused below.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise RecipeError(f"{path} is not a regular file (a FIFO, device or socket): not a recipe")
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RecipeError(f"{path} is over {MAX_BYTES} bytes: too big for a recipe (a few KiB of YAML)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path} is not UTF-8 text (byte {error.start}): not a recipe") from None
    try:
        check_yaml(text, path)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return text


_jsonargparse_read_text = Path.read_text


def _read_text(self: Path) -> str:
    if self.is_url or self.is_fsspec or str(self) == "-":  # off unless enabled; stdin is the user's own pipe
        return _jsonargparse_read_text(self)
    return read_recipe_file(self.absolute)


def install() -> None:
    """Bound every YAML jsonargparse reads: files (``--config``, a file as an option's value, one named inside a
    recipe) through :func:`read_recipe_file`, and text (values on the command line, and files again) through
    :func:`check_yaml` before its loader. Idempotent."""
    Path.read_text = _read_text
    loader = get_loader("yaml")
    if getattr(loader, "bounded", False):
        return

    def load(text: str, path: str = ""):
        try:
            check_yaml(text, path or "a YAML value")
        except yaml.YAMLError:
            pass  # the loader raises it, and jsonargparse reports it or takes the text as a plain string
        return loader(text)

    load.bounded = True
    set_loader("yaml", load, (yaml.YAMLError,))
