"""benchmarks/timeline.py: a run's steps drawn as an SVG timeline (bench_vm_restart --svg)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from benchmarks.timeline import COLOURS, Step, svg

NS = "{http://www.w3.org/2000/svg}"


def test_one_bar_per_step_on_a_common_axis():
    steps = [Step("vm save", 0.0, 1.5, "handover"), Step("kexec", 1.5, 31.5, "kernel"),
             Step("restore <&>", 31.5, 33.0, "vmm")]
    root = ET.fromstring(svg("VM restart", steps, note="pause 33 s"))
    bars = [r for r in root.iter(NS + "rect") if r.find(NS + "title") is not None]
    assert [b.find(NS + "title").text for b in bars] == ["vm save: 1.50 s", "kexec: 30.00 s",
                                                          "restore <&>: 1.50 s"]
    x = [float(b.get("x")) for b in bars]
    w = [float(b.get("width")) for b in bars]
    # each bar starts where the previous one ends, and the widths keep the durations' ratio
    assert abs(x[0] + w[0] - x[1]) < 0.2 and abs(x[1] + w[1] - x[2]) < 0.2
    assert abs(w[1] / w[0] - 20) < 0.1
    assert [b.get("fill") for b in bars] == [COLOURS["handover"], COLOURS["kernel"], COLOURS["vmm"]]
    texts = "".join(t.text or "" for t in root.iter(NS + "text"))
    assert "30 s" in texts and "pause 33 s" in texts


def test_no_steps_still_draws_an_axis():
    root = ET.fromstring(svg("empty", []))
    assert any((t.text or "") == "0 s" for t in root.iter(NS + "text"))
