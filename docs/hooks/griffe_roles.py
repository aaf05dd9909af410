"""Griffe extension: the Sphinx roles in the docstrings (``:class:`MemoryBuffer```, ``:func:`~iscse.smooth```) become
code that links to the object's entry in the API reference, where it has one; reST's ``Example::`` before a literal
block becomes a bold ``Example:`` (the indented block below it is a code block in Markdown too).

Why: the docstrings cite objects the Sphinx way, which Markdown would show as ``:class:`` followed by code. Each
role becomes ``<autoref identifier="full.path" optional><code>name</code></autoref>``: mkdocs-autorefs makes it a
link when the reference documents ``full.path``, and leaves the code unlinked (without a warning) when it does not
(a private name, a module shown only in prose). A name is resolved the way Python would from the docstring's object:
``MemoryBuffer`` in ``iscse.loss`` is ``iscse.buffer.MemoryBuffer``. ``~`` shows only the last component, as in
Sphinx. Loaded by mkdocstrings (mkdocs.yml's python handler ``extensions``), so it runs under Zensical too.
"""
import html
import re

import griffe

# a line ending in "::" (reST: a literal block follows)
_LITERAL = re.compile(r"^(?P<indent>[ \t]*)(?P<text>\S.*?)::[ \t]*$", re.M)
# A short label ("Example", "For instance") would read as a Google-style section title once its "::" is ":".
_LABEL = re.compile(r"^[A-Za-z][A-Za-z ]{0,30}$")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|type):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _identifier(obj, target: str):
    """The full path of ``target`` as seen from ``obj``, or None."""
    target = target.strip().rstrip("()")
    head, _, rest = target.partition(".")
    scope = obj
    while scope is not None:
        try:
            full = scope.resolve(head)
            return f"{full}.{rest}" if rest else full
        except Exception:  # griffe's NameResolutionError, or a scope that cannot resolve names
            scope = scope.parent
    return target if "." in target else None


def _rewrite(obj, text: str) -> str:
    def replace(match):
        target = match.group("target").strip()
        shown = target.rsplit(".", 1)[-1] if match.group("tilde") else target
        code = f"<code>{html.escape(shown)}</code>"
        ident = _identifier(obj, target)
        if ident is None:
            return code
        return f'<autoref identifier="{html.escape(ident, quote=True)}" optional>{code}</autoref>'

    def literal(match):
        label = match.group("text")
        return match.group("indent") + (f"**{label}:**" if _LABEL.match(label) else f"{label}:")

    return _LITERAL.sub(literal, _ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring in a package once it is loaded."""

    def on_package(self, *, pkg, **kwargs) -> None:
        seen = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
