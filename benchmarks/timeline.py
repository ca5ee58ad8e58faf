"""A run drawn as a timeline picture (SVG), in the manner of ``systemd-analyze plot``: one bar
per step, from its start to its end on a common time axis in seconds, coloured by who spends
the time, with the step's name and duration beside it. Pure: steps in, SVG text out.

    svg("VM restart across a host kexec", [Step("vm save", 0.0, 1.2, "handover"), ...])
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

#: who spends the time -> bar colour
COLOURS = {"handover": "#d9534f", "vmm": "#5b8def", "kernel": "#8c6bb1", "lab": "#b0b0b0",
           "guest": "#5cb85c"}
ROW, BAR, LEFT, TOP, WIDTH = 22, 14, 10, 40, 900


@dataclass(frozen=True)
class Step:
    name: str
    start: float        # seconds from the run's origin
    end: float
    who: str = "lab"    # a key of COLOURS


def svg(title: str, steps: list[Step], note: str = "") -> str:
    """The SVG document (UTF-8 text) of ``steps``; an empty list gives an empty axis."""
    span = max([s.end for s in steps] + [1.0])
    scale = (WIDTH - LEFT - 260) / span
    height = TOP + ROW * len(steps) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>']
    # the axis: a tick every 1, 2, 5, 10, 20, 50 ... seconds, about ten of them
    tick = next(t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if span / t <= 12)
    y_axis = TOP + ROW * len(steps) + 6
    n = 0
    while n * tick <= span + 1e-9:
        x = LEFT + n * tick * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{y_axis}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{y_axis + 14}" text-anchor="middle" fill="#666">'
                   f'{n * tick:g} s</text>')
        n += 1
    for i, s in enumerate(steps):
        y = TOP + ROW * i
        x0, w = LEFT + s.start * scale, max((s.end - s.start) * scale, 1.0)
        colour = COLOURS.get(s.who, COLOURS["lab"])
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{w:.1f}" height="{BAR}" fill="{colour}">'
                   f'<title>{escape(s.name)}: {s.end - s.start:.2f} s</title></rect>')
        out.append(f'<text x="{x0 + w + 6:.1f}" y="{y + BAR - 3}">{escape(s.name)} '
                   f'({s.end - s.start:.1f} s)</text>')
    lx = LEFT
    for who, colour in COLOURS.items():
        out.append(f'<rect x="{lx}" y="{y_axis + 26}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="{y_axis + 36}">{who}</text>')
        lx += 100
    if note:
        out.append(f'<text x="{lx + 10}" y="{y_axis + 36}" fill="#666">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
