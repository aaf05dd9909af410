"""MkDocs hook: the maths that pymdownx.arithmatex marks up (generic mode) becomes MathML when the site is built.

Why MathML at build time: every current browser draws MathML itself, so the pages need no JavaScript renderer and no
web fonts, and the built site shows its maths offline. A formula latex2mathml cannot convert is logged as a warning,
which fails ``mkdocs build --strict``. (Zensical does not run MkDocs hooks: there the TeX shows as written.)
"""
import html
import logging
import re

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

# arithmatex's generic output: <span class="arithmatex">\(TeX\)</span> inline, <div class="arithmatex">\[TeX\]</div>
# for a block; the TeX inside is HTML-escaped.
_MATH = re.compile(r'<(span|div) class="arithmatex">\\([(\[])(.*?)\\[)\]]</\1>', re.S)


def on_page_content(content, page, **kwargs):
    def to_mathml(match):
        tag, opener, tex = match.group(1), match.group(2), html.unescape(match.group(3)).strip()
        display = "block" if opener == "[" else "inline"
        try:
            mathml = convert(tex, display=display)
        except Exception as exc:  # latex2mathml raises several types; any of them means "not converted"
            log.warning("%s: cannot convert the formula %r to MathML: %s", page.file.src_path, tex, exc)
            return match.group(0)
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _MATH.sub(to_mathml, content)
