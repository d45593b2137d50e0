"""HTML pieces of the pages hpcgan writes: `hpcgan report` and the Turing test's section of it. Table headers,
numbers, image attributes and the title are escaped here; every other cell is HTML, so callers escape text."""

import html

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def number(v) -> str:
    """A value as a cell: four significant digits, "-" when it is not a number (not measured)."""
    return "-" if not isinstance(v, (int, float)) else html.escape(f"{v:.4g}")


def table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(src, alt) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def page(title: str, sections: list) -> str:
    """A self-contained page: the sections (HTML) one per line, in one stylesheet."""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
