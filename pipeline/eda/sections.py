"""The sections of the EDA page, each built from the ``eda.json`` dict and the rendered figures."""
from __future__ import annotations

from .report import HTML_ROWS, esc, figure, fmt, section, table

SPLITS = ("train", "test")


def _both(report: dict, fn) -> list:
    return [fn(report["images"][s]) for s in SPLITS]


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {fmt(v)}" for k, v in d.items()) or "—"


def summary(report: dict) -> str:
    props, dups, cls = report["images"], report["duplicates"], report["classes"]
    w, h = props["train"]["summary"]["width"], props["train"]["summary"]["height"]
    rows = [["images", *_both(report, lambda p: p["images"])],
            ["unreadable", *(report["unreadable"][s] for s in SPLITS)],
            ["classes / imbalance ratio", f"{cls['n_classes']} / {fmt(cls['imbalance_ratio'])}", "—"],
            ["median size (w×h)", *_both(report, lambda p: f"{fmt(p['summary']['width'].get('p50'))}×"
                                                          f"{fmt(p['summary']['height'].get('p50'))}")],
            ["duplicate groups within split (exact / near)",
             *(f"{dups['exact'][f'within_{s}']['groups']} / {dups['near'][f'within_{s}']['groups']}" for s in SPLITS)],
            ["test images duplicated in train (exact / near)", "—",
             f"{dups['exact']['train_test']['test_images']} / {dups['near']['train_test']['test_images']}"],
            ["duplicate groups with conflicting labels", dups["any"]["conflicting_labels"]["groups"], "—"],
            ["channel mean (RGB)", *(report["channels"][s]["mean"] for s in SPLITS)],
            ["channel std (RGB)", *(report["channels"][s]["std"] for s in SPLITS)]]
    sugg = "".join(f"<li><b>{esc(s['topic'])}</b>: {esc(s['text'])}"
                   + "".join(f" <code>--set {esc(o)}</code>" for o in s["set"]) + "</li>"
                   for s in report["suggestions"] if s["topic"] != "plan")
    problems = report["problems"]
    probs = (f'<h3 class="warn">{len(problems)} data-contract problem(s)</h3>'
             + table(["problem"], [[p] for p in problems], HTML_ROWS)) if problems else ""
    note = (f'<p class="muted">Train widths {fmt(w.get("p0"))}–{fmt(w.get("p100"))} px, '
            f'heights {fmt(h.get("p0"))}–{fmt(h.get("p100"))} px.</p>')
    return section("summary", "Summary", table(["", "train", "test"], rows) + note + probs + plan(report)
                   + f'<h3>Suggestions</h3><ul class="sugg">{sugg}</ul>')


def plan(report: dict) -> str:
    """What ``recipe: auto`` takes from these figures and why (the ``plan`` suggestion), above the advice."""
    found = [s["text"] for s in report["suggestions"] if s["topic"] == "plan"]
    return "".join(f'<h3>Plan</h3><p class="ok">{esc(text)}</p>' for text in found)


def classes(report: dict, figs: dict) -> str:
    cls, groups = report["classes"], report["groups"]
    total = max(sum(cls["counts"].values()), 1)
    rows = [[k, v, f"{100 * v / total:.1f}%"] for k, v in cls["counts"].items()]
    body = figure(figs.get("classes"), "class counts") + table(["class", "train images", "share"], rows, 60)
    if cls["unlabelled"]:
        body += f'<p class="warn">{cls["unlabelled"]} train rows have no label.</p>'
    if groups:
        body += (f"<h3>Groups ({groups['n_groups']:,})</h3>" + figure(figs.get("groups"), "group sizes")
                 + f"<p>{groups['groups_with_several_labels']} groups contain more than one label.</p>"
                 + table(["largest groups", "images"], groups["largest"].items(), 10))
    return section("classes", "Classes", body)


def images(report: dict, figs: dict) -> str:
    rows = [["readable", *_both(report, lambda p: p["readable"])],
            ["modes", *_both(report, lambda p: _counts(p["modes"]))],
            ["formats", *_both(report, lambda p: _counts(p["formats"]))],
            ["16/32-bit images", *_both(report, lambda p: p["high_depth"])],
            ["EXIF-rotated (orientation ≠ 1)", *_both(report, lambda p: p["exif_rotated"]["count"])],
            ["extension ≠ actual format", *_both(report, lambda p: p["extension_mismatch"])]]
    keys = ["p0", "p5", "p50", "p95", "p100", "mean"]
    stats = [[feature, split, *(report["images"][split]["summary"][feature].get(k) for k in keys)]
             for feature in ("width", "height", "aspect", "file_bytes") for split in SPLITS]
    body = (table(["property", "train", "test"], rows) + figure(figs.get("geometry"), "image geometry")
            + table(["feature", "split", "min", "p5", "median", "p95", "max", "mean"], stats))
    named = _files_behind_counts(report)
    if named:
        body += ("<h3>Files behind these counts</h3><p class=\"muted\">All of them are in image_flags.csv "
                 "(and eda.json).</p>" + table(["count", "split", "files"], named, HTML_ROWS))
    return section("images", "Image properties", body)


def _files_behind_counts(report: dict) -> list[list]:
    """(count, split, file list) rows for every non-zero count of the image-properties table."""
    rows = []
    for s in SPLITS:
        p = report["images"][s]
        lists = [*((f"mode {m}", files) for m, files in p.get("mode_files", {}).items()),
                 ("16/32-bit", p.get("high_depth_files", [])), ("EXIF-rotated", p["exif_rotated"].get("files", [])),
                 ("extension ≠ format", p.get("extension_mismatch_files", []))]
        rows += [[name, s, ", ".join(files[:HTML_ROWS]) + (" …" if len(files) > HTML_ROWS else "")]
                 for name, files in lists if files]
    return rows


def colour(report: dict, figs: dict) -> str:
    ch = report["channels"]
    rows = [[c, *(ch[s][k][i] if ch[s]["mean"] else None for s in SPLITS for k in ("mean", "std"))]
            for i, c in enumerate("RGB")]
    drift = [[k, v["train_mean"], v["test_mean"], v["ks"], f"{v['p']:.2g}", "shift" if v["shift"] else "ok"]
             for k, v in report["drift"].items()]
    body = ("<p>Per-channel statistics in [0, 1], each image weighted equally. The train row is what "
            "training normalization should use (<code>normalization</code> in eda.json).</p>"
            + table(["channel", "train mean", "train std", "test mean", "test std"], rows)
            + "<h3>Train vs test drift (two-sample Kolmogorov–Smirnov; flagged when D &gt; 0.1 and p &lt; 0.01)</h3>"
            + table(["feature", "train mean", "test mean", "KS D", "p", "verdict"], drift)
            + figure(figs.get("colour"), "brightness, contrast and channel means"))
    return section("colour", "Colour & normalization", body)


def samples(figs: dict) -> str:
    return section("samples", "Samples", "<p>Random readable images per class (last row: test).</p>"
                   + figure(figs.get("samples"), "sample grid"))


def files(report: dict) -> str:
    bad = report["unreadable"]["files"]
    if not bad:
        return section("files", "Unreadable files", '<p class="ok">Every image decodes.</p>')
    rows = [[b["split"], b["id"], b["path"], b["kind"], b["bytes"], b["error"]] for b in bad]
    return section("files", "Unreadable files", f'<p class="warn">{len(bad)} file(s) cannot be decoded.</p>'
                   + table(["split", "id", "path", "kind", "bytes", "error"], rows, HTML_ROWS))


def duplicates(report: dict, figs: dict) -> str:
    d = report["duplicates"]
    head = ["kind", "groups", "images", "pairs", "within train", "within test", "train/test (test imgs)",
            "conflicting labels"]
    rows = [[kind, s["groups"], s["images"], s["pairs"], s["within_train"]["groups"], s["within_test"]["groups"],
             f"{s['train_test']['groups']} ({s['train_test']['test_images']})", s["conflicting_labels"]["groups"]]
            for kind, s in (("exact (same bytes)", d["exact"]), (f"near (pHash ≤ {d['near_threshold']} bits)",
                                                                   d["near"]), ("either", d["any"]))]
    kinds = d["near_pair_kinds"]
    body = table(head, rows) + (
        f"<p>Near duplicates: pHash within {d['near_threshold']} of 64 bits <i>and</i> 16×16 grey thumbnails "
        f"correlating ≥ {d['near_min_corr']} ({d['near']['pairs']:,} of {d['near_hash_candidates']:,} hash "
        f"candidates kept). Near pairs: {kinds['train_train']:,} train–train ({kinds['conflicting_labels']:,} with "
        f"different labels), {kinds['train_test']:,} train–test, {kinds['test_test']:,} test–test. Groups join "
        "linked images transitively.</p><p class=\"muted\">Counts are exact; lists are capped. Every grouped "
        "image is in duplicate_groups.csv (column dup_group: use it as CV groups).</p>")
    for kind in ("exact", "near"):
        listed = [[", ".join(g["flags"]),
                   "; ".join(f"{m['split']}:{m['id']}" + (f" ({m['label']})" if m["label"] else "")
                             for m in g["members"][:8]) + (" …" if len(g["members"]) > 8 else "")]
                  for g in d[kind]["listed"]]
        if listed:
            body += (f"<h3>{kind.title()} duplicate groups</h3>" + figure(figs.get(f"dups_{kind}"), f"{kind} examples")
                     + table(["flags", "members"], listed, HTML_ROWS))
    return section("duplicates", "Duplicates", body)


def build(report: dict, figs: dict) -> list[str]:
    return [summary(report), classes(report, figs), images(report, figs), colour(report, figs),
            samples(figs), files(report), duplicates(report, figs)]
