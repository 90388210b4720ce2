"""The report: targets, merging a run's records into the saved ones,
``RESULTS.md`` (tables, sizes, memory, notes) with its SVG chart, and the
speed figures of the repository README, all from ``RESULTS.json``."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict

import peers
from measure import Record
from workloads import OPS

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- targets
# (workload key or "*", operation, cimfs tool, peer tool) -> highest acceptable ratio cimfs/peer
TARGETS = {
    ("1", "create", "*", "mksquashfs"): 1.0,
    ("3", "create", "*", "mksquashfs"): 1.0,
    ("2", "create", "*", "mksquashfs"): 1.5,
    ("*", "extract", "cimfs extract", "unsquashfs"): 1.0,
    ("*", "read", "cimfs mount", "squashfuse"): 1.0,
    ("*", "stat", "cimfs mount", "squashfuse"): 1.0,
    ("*", "random", "cimfs mount", "squashfuse"): 1.0,
    ("4", "fork", "*", "cimfs create of (1)"): 0.1,
}
RSS_TARGET_KIB = {("5", "create"): 1 << 20}  # 1 GiB
SIZE_TARGET = {"1": 0.05, "3": 0.05}  # |cimfs/squashfs - 1|


def target_for(wkey: str, op: str, tool: str, peer: str):
    for k in ((wkey, op, tool, peer), (wkey, op, "*", peer), ("*", op, tool, peer), ("*", op, "*", peer)):
        if k in TARGETS:
            return TARGETS[k]
    return None


# ---------------------------------------------------------------- report
def machine() -> dict:
    m = {"platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    m["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            m["memory"] = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    try:
        r = subprocess.run(["df", "-T", HERE], capture_output=True, text=True)
        parts = r.stdout.splitlines()[1].split()
        m["filesystem"] = f"{parts[1]} on {parts[0]}"
    except (OSError, IndexError):
        pass
    return m


def merge(old: list[dict], new: list[Record]) -> list[dict]:
    key = lambda r: (r["workload"], r["op"], r["tool"])  # noqa: E731
    out = {key(r): r for r in old}
    for r in new:
        d = asdict(r)
        if d["status"].startswith("n/a") and key(d) in out and out[key(d)]["status"] == "ok":
            continue  # keep an earlier real measurement rather than a skip
        out[key(d)] = d
    return sorted(out.values(), key=lambda r: (r["workload"], OPS.index(r["op"]) if r["op"] in OPS else 99, r["tool"]))


def fmt_s(x):
    return "—" if x is None else (f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.0f} ms")


def fmt_mib(kib):
    return "—" if not kib else (f"{kib / 1024:.0f} MiB" if kib < 10 << 20 else f"{kib / (1 << 20):.1f} GiB")


def fmt_bytes(n):
    return "—" if not n else f"{n / 1e6:,.1f} MB"


def paired_ratio(a: dict, b: dict):
    """Median over runs of a[i]/b[i] (runs alternate, so pairs share conditions)."""
    ta, tb = a["times"], b["times"]
    n = min(len(ta), len(tb))
    if not n:
        return None
    return statistics.median(ta[i] / tb[i] for i in range(n))


def render(records: list[dict], wdesc: dict, mach: dict, vers: dict, runs_note: str) -> tuple[str, list]:
    by = {}
    for r in records:
        by.setdefault((r["workload"], r["op"]), {})[r["tool"]] = r
    lines = []
    plot = []  # (label, ratio, target)
    lines.append(
        "| workload | operation | cimfs | cimfs time | peer | peer time | ratio cimfs/peer | target | cimfs peak RSS | peer peak RSS |"
    )
    lines.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    fullcreate = None
    if ("1", "create") in by:
        for t in ("cimfs create", "cimfs (library)"):
            r = by[("1", "create")].get(t)
            if r and r["status"] == "ok":
                fullcreate = r
                break
    for (wk, op), tools in sorted(
        by.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]) if kv[0][1] in OPS else 99)
    ):
        cims = [t for t in tools if t.startswith("cimfs")]
        peers_ = [t for t in tools if not t.startswith("cimfs")]
        if op == "fork" and fullcreate:
            peers_ = ["cimfs create of (1)"] + peers_
        for c in cims:
            cr = tools[c]
            for p in peers_ or ["—"]:
                pr = fullcreate if p == "cimfs create of (1)" else tools.get(p)
                ctime = statistics.median(cr["times"]) if cr["status"] == "ok" and cr["times"] else None
                ptime = statistics.median(pr["times"]) if pr and pr["status"] == "ok" and pr["times"] else None
                if p == "cimfs create of (1)":
                    ratio = ctime / ptime if ctime and ptime else None
                else:
                    ratio = paired_ratio(cr, pr) if ctime and ptime else None
                tgt = target_for(wk, op, c, p)
                ctext = fmt_s(ctime) if cr["status"] == "ok" else cr["status"]
                ptext = fmt_s(ptime) if pr and pr["status"] == "ok" else (pr["status"] if pr else "—")
                if p == "cimfs create of (1)":
                    ptext += f" ({pr['tool']})"
                mark = ""
                if ratio is not None and tgt is not None:
                    mark = " ✅" if ratio <= tgt else " ❌"
                rtext = f"{ratio:.2f}{mark}" if ratio is not None else "n/a"
                lines.append(
                    f"| {wk} {wdesc.get(wk, '')} | {op} | {c} | {ctext} | {p} | {ptext} | {rtext} | "
                    f"{'≤ %.1f' % tgt if tgt is not None else ''} | {fmt_mib(max(cr['rss_kib']) if cr['rss_kib'] else 0)} | "
                    f"{fmt_mib(max(pr['rss_kib']) if pr and pr.get('rss_kib') else 0)} |"
                )
                if ratio is not None and (tgt is not None or c in ("cimfs create", "cimfs (library)")):
                    plot.append((f"{wk} {op}: {c.replace('cimfs ', '')} / {p}", ratio, tgt))
    # sizes
    size_lines = [
        "| workload | cimfs (CLI) | cimfs (library) | squashfs (uncompressed) | erofs | cimfs/squashfs | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (wk, op), tools in sorted(by.items()):
        if op != "create":
            continue
        g = lambda t: tools.get(t, {}).get("size", 0)  # noqa: E731
        c = g("cimfs create") or g("cimfs (library)")
        s = g("mksquashfs")
        ratio = f"{c / s:.3f}" if c and s else "n/a"
        tgt = SIZE_TARGET.get(wk)
        if tgt is not None and c and s:
            ratio += " ✅" if abs(c / s - 1) <= tgt else " ❌"
        size_lines.append(
            f"| {wk} {wdesc.get(wk, '')} | {fmt_bytes(g('cimfs create'))} | {fmt_bytes(g('cimfs (library)'))} | "
            f"{fmt_bytes(s)} | {fmt_bytes(g('mkfs.erofs'))} | {ratio} | {'±%d %%' % (tgt * 100) if tgt else ''} |"
        )
    rss_lines = []
    for (wk, op), kib in RSS_TARGET_KIB.items():
        tools = by.get((wk, op), {})
        for t in ("cimfs create", "cimfs (library)"):
            r = tools.get(t)
            if r and r["status"] == "ok" and r["rss_kib"]:
                v = max(r["rss_kib"])
                rss_lines.append(
                    f"- workload {wk} {op}, {t}: peak RSS {fmt_mib(v)} (target ≤ {fmt_mib(kib)}) {'✅' if v <= kib else '❌'}"
                )
    return "\n".join(lines), size_lines, rss_lines, plot


def cpu_lines(records: list[dict]) -> list[str]:
    """CPU time (user + system, the command's and its workers') beside wall
    time and the machine's load, per row measured with them: on a shared
    machine the CPU ratio says more than the wall ratio."""
    by = {}
    for r in records:
        if r["status"] == "ok" and any(c is not None for c in r.get("cpu") or []):
            by.setdefault((r["workload"], r["op"]), {})[r["tool"]] = r
    if not by:
        return []
    out = [
        "| workload | operation | tool | wall (median) | CPU user+sys (median) | CPU / wall | CPU ratio cimfs/peer | 1-min load at the runs |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for (wk, op), tools in sorted(
        by.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]) if kv[0][1] in OPS else 99)
    ):
        cims = [t for t in tools if t.startswith("cimfs")]
        for t, r in sorted(tools.items()):
            cpu = [c for c in r["cpu"] if c is not None]
            wall, c = statistics.median(r["times"]), statistics.median(cpu)
            ratios = []
            if not t.startswith("cimfs"):
                for ct in cims:  # median over runs of cimfs/peer, runs paired as for time
                    pairs = [(a, b) for a, b in zip(tools[ct]["cpu"], r["cpu"]) if a is not None and b]
                    if pairs:
                        ratios.append(f"{ct}: {statistics.median(a / b for a, b in pairs):.2f}")
            out.append(
                f"| {wk} | {op} | {t} | {fmt_s(wall)} | {fmt_s(c)} | {c / wall:.2f} | {'; '.join(ratios)} | "
                f"{', '.join(f'{x:.1f}' for x in r.get('load') or [])} |"
            )
    return out


def svg_plot(plot: list, path: str) -> None:
    """A horizontal bar chart of the ratios (log scale), target marks in red."""
    import math

    if not plot:
        return
    w, row, left, right = 900, 22, 330, 40
    h = 50 + row * len(plot)
    lo, hi = 0.01, max(10.0, max(r for _, r, _ in plot) * 1.2)
    x = lambda v: (
        left + (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (w - left - right)
    )  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="16" font-weight="bold">time ratio cimfs / peer (log scale; red tick = target; &lt; 1 means cimfs is faster)</text>',
    ]
    for v in (0.01, 0.1, 1, 10, 100):
        if v <= hi:
            out.append(
                f'<line x1="{x(v):.1f}" y1="24" x2="{x(v):.1f}" y2="{h - 8}" stroke="#ccc"/>'
                f'<text x="{x(v):.1f}" y="{h - 0}" text-anchor="middle" fill="#666">{v:g}</text>'
            )
    for i, (label, r, tgt) in enumerate(plot):
        y = 30 + i * row
        ok = tgt is None or r <= tgt
        color = "#4a90d9" if tgt is None else ("#3a3" if ok else "#d33")
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{label.replace("&", "&amp;").replace("<", "&lt;")}</text>'
        )
        out.append(f'<rect x="{x(lo):.1f}" y="{y + 3}" width="{x(r) - x(lo):.1f}" height="{row - 6}" fill="{color}"/>')
        out.append(f'<text x="{x(r) + 4:.1f}" y="{y + 14}">{r:.2f}</text>')
        if tgt is not None:
            out.append(
                f'<line x1="{x(tgt):.1f}" y1="{y}" x2="{x(tgt):.1f}" y2="{y + row}" stroke="red" stroke-width="2"/>'
            )
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_report(records: list[dict], path: str, suite, extra: str = "") -> None:
    wdesc = {k: f"{w.name}" for k, w in suite.workloads.items()}
    mach = machine()
    vers = peers.versions(suite.tools)
    table, sizes, rss, plot = render(records, wdesc, mach, vers, "")
    svg = os.path.splitext(path)[0].lower().replace("results", "results") + ".svg"
    svg_plot(plot, svg)
    commits = sorted({r.get("commit", "?") for r in records})
    dates = sorted({r.get("date", "?") for r in records})
    md = [
        f"# cimfs benchmark results{' (quick)' if suite.a.quick else ''}",
        "",
        "Generated by `python bench/run.py` (see `bench/README.md`). Times are medians of alternating runs; "
        "the ratio is the median over runs of cimfs/peer from the same run (lower is better, < 1 means cimfs is faster). "
        "Peak RSS is the measured command's: the larger of GNU time's `%M` and the sum over its processes sampled every 20 ms "
        "(cimfs create forks data processes); for mounted operations it is the FUSE daemon's `VmHWM`.",
        "",
        f"- measured: {', '.join(dates)} at commit(s) {', '.join(commits)}",
        "- machine: " + "; ".join(f"{k} {v}" for k, v in mach.items()),
        "- tools: " + "; ".join(f"{v}" for v in vers.values()),
        "",
        "## Workloads",
        "",
    ]
    for k, w in suite.workloads.items():
        src = w.src if w.src else f"parent: image of ({w.fork_parent})"
        md.append(f"{k}. **{w.name}**: {w.description} — `{src}`")
    md += [
        "",
        "## Time",
        "",
        table,
        "",
        f"![ratios]({os.path.basename(svg)})",
        "",
        "## Image size (apparent bytes; cimfs = .cim + region + objectid files)",
        "",
    ]
    md += sizes
    md += ["", "## Memory", ""] + (rss or ["- (workload 5 not measured yet)"])
    cpu = cpu_lines(records)
    if cpu:
        md += [
            "",
            "## CPU time and load",
            "",
            "User + system seconds of each command and the processes it waited for (`wait4`), for the rows "
            "measured since CPU time was recorded; the load is the 1-minute load average as each run started "
            "(the machine has 2 cores).",
            "",
        ] + cpu
    if extra:
        md += ["", extra]
    md.append("")
    with open(path, "w") as f:
        f.write("\n".join(md))


# ---------------------------------------------------------------- README figures
README_BEGIN = "<!-- speed: generated by bench/run.py from bench/RESULTS.json; edits here are overwritten -->"
README_END = "<!-- end of speed -->"
# (operation, the cimfs tool quoted, its peers) in the order the README lists them
README_ROWS = (
    ("create", "cimfs create", ("mksquashfs", "mkfs.erofs")),
    ("extract", "cimfs extract", ("unsquashfs", "tar x")),
    ("read", "cimfs mount", ("squashfuse",)),
    ("stat", "cimfs mount", ("squashfuse",)),
    ("random", "cimfs mount", ("squashfuse",)),
    ("fork", "cimfs fork", ("cimfs create of (1)", "mksquashfs append")),
)


def readme_speed(records: list[dict], wdesc: dict) -> str:
    """The README's speed figures: per workload and operation, cimfs's median
    time and its ratio to each peer measured in the same run, and the peak
    memory of the largest create, with the commits they were measured at."""
    by = {}
    for r in records:
        if not r.get("quick"):
            by.setdefault((r["workload"], r["op"]), {})[r["tool"]] = r
    ok = lambda r: r is not None and r["status"] == "ok" and r["times"]  # noqa: E731
    full = by.get(("1", "create"), {}).get("cimfs create")
    lines = [
        "| workload | operation | cimfs | time | vs. peer (ratio of paired runs; < 1: cimfs faster) |",
        "|---|---|---|---:|---|",
    ]
    commits = set()
    for op, tool, peer_names in README_ROWS:
        for wk in sorted({k for k, o in by if o == op}):
            tools = by[(wk, op)]
            c = tools.get(tool)
            if not ok(c):
                continue
            ratios = []
            for p in peer_names:
                pr = full if p == "cimfs create of (1)" else tools.get(p)
                if not ok(pr):
                    continue
                ratio = (
                    statistics.median(c["times"]) / statistics.median(pr["times"])
                    if p == "cimfs create of (1)"
                    else paired_ratio(c, pr)
                )
                ratios.append(f"{ratio:.2f} × {'a full create of (1)' if p == 'cimfs create of (1)' else p}")
                commits.add(pr.get("commit", "?"))
            commits.add(c.get("commit", "?"))
            lines.append(
                f"| {wk} {wdesc.get(wk, '')} | {op} | `{tool}` | {fmt_s(statistics.median(c['times']))} | "
                f"{', '.join(ratios) or '—'} |"
            )
    memory = []
    for (wk, op), kib in RSS_TARGET_KIB.items():
        r = by.get((wk, op), {}).get("cimfs create")
        if ok(r) and r["rss_kib"]:
            memory.append(
                f"`cimfs create` of workload {wk} ({wdesc.get(wk, '')}) peaks at {fmt_mib(max(r['rss_kib']))} "
                "(all its processes)."
            )
            commits.add(r.get("commit", "?"))
    foot = (" ".join(memory) + " " if memory else "") + (
        f"Measured at commit(s) {', '.join(sorted(commits))}; the machine, every peer and the sizes are in "
        "[`bench/RESULTS.md`](bench/RESULTS.md)."
    )
    return "\n".join(lines) + "\n\n" + foot


def update_readme(path: str, records: list[dict], wdesc: dict) -> bool:
    """Rewrite the figures between the README's markers; False if it has none."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(README_BEGIN)] + "\n" + readme_speed(records, wdesc) + "\n" + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return True
