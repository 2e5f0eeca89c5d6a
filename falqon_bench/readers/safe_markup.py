"""Text from result files into markdown and HTML that cannot run code or break the page.

A report is opened in a browser and its markdown on a code host, and every string in it that comes
from a results file or a manifest (method, layer, error, device, run id, versions, ...) was written by
whoever made that file. So:
- md_text escapes such a string for one line of markdown (a table cell, a list item, a heading):
  &, <, > become entities and every markdown-active character (| ` * _ [ ] ~ # $ \\) is backslash-
  escaped, newlines and control characters become spaces, so a value can neither close a table cell
  nor start a link, an image, an HTML tag or a new block;
- markdown_to_html renders the report's markdown with raw HTML turned off, inlines only the named
  figure files as data: URIs, and declares a Content-Security-Policy that allows no script, no
  network and no other source than those images and the page's one <style> element (by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path
from typing import Any, Iterable

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
# markdown-active punctuation; '_' is escaped only at a word boundary (intraword '_' never emphasises)
_ACTIVE = re.compile(r"[\\`*\[\]|~#$!{}]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# what may stand in a code span as is: identifiers, variant labels ('falqon[flush_every=1]+compile †')
_PLAIN_CODE = re.compile(r"[A-Za-z0-9_.\-/+ †\[\]=,]+")


def md_text(value: Any) -> str:
    """`value` as inert markdown text on one line: renders back to the same characters, but as text only."""
    text = _CONTROL.sub(" ", str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _ACTIVE.sub(lambda m: "\\" + m.group(0), text)


def md_code(value: Any) -> str:
    """`value` in a code span when it is a plain name (no backtick can end the span), else md_text."""
    text = str(value)
    return f"`{text}`" if _PLAIN_CODE.fullmatch(text) else md_text(text)


PAGE_STYLE = """body{font-family:system-ui,-apple-system,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}
.align-left{text-align:left}.align-right{text-align:right}.align-center{text-align:center}"""


def content_security_policy(style: str = PAGE_STYLE) -> str:
    """No script, no fetch, no frames, no forms: only data: images and the one <style> element (by hash)."""
    digest = base64.b64encode(hashlib.sha256(style.encode("utf-8")).digest()).decode("ascii")
    return f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"


def markdown_to_html(md: str, title: str, images: Iterable[str], image_dir: Path) -> str:
    """A self-contained page: `md` rendered with raw HTML off; each file named in `images` (PNG, in
    image_dir) inlined as a data: URI. Table alignment becomes classes (inline style attributes would
    need 'unsafe-inline' in the policy)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    body = re.sub(r' style="text-align:(left|right|center)"', r' class="align-\1"', body)
    for name in images:
        data = base64.b64encode((Path(image_dir) / name).read_bytes()).decode("ascii")
        body = body.replace(f'src="{html.escape(name)}"', f'src="data:image/png;base64,{data}"')
    csp = content_security_policy()  # our own constant: single quotes only, safe inside "..."
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>\n{body}</body></html>\n")
