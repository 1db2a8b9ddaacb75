"""The evaluation summary as markdown (report.md next to metrics.json)."""

from __future__ import annotations

from collections.abc import Mapping

from orthovision.evaluation.results import EvaluationReport


def cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_report(report: EvaluationReport, title: str, context: Mapping | None = None) -> str:
    lines = [f"# {title}", ""]
    for key, value in (context or {}).items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    for level, block in (("Image level", report.image), ("Group level", report.group)):
        lines += [
            f"## {level} (n = {block['n']})",
            "",
            f"accuracy {cell(block['accuracy'])}, macro-F1 {cell(block['macro_f1'])}, "
            f"ECE {cell(block['calibration']['ece'])}",
            "",
            "| class | support | precision | recall | F1 | accuracy | sensitivity | specificity "
            "| ROC AUC (95% CI) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in block["per_class"].items():
            auc = block["roc_auc"].get(name, {})
            if row.get("status"):
                lines.append(f"| {name} | 0 | {row['status']} | | | | | | |")
                continue
            ci = auc.get("ci95")
            auc_s = (
                f"{auc['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
                if "auc" in auc and ci
                else cell(auc.get("auc"))
                if "auc" in auc
                else auc.get("status", "n/a")
            )
            lines.append(
                f"| {name} | {row['support']} | {cell(row['precision'])} | {cell(row['recall'])} "
                f"| {cell(row['f1'])} | {cell(row['accuracy'])} | {cell(row['sensitivity'])} "
                f"| {cell(row['specificity'])} | {auc_s} |"
            )
        means = {k: v for k, v in block.items() if k.startswith(("macro_", "weighted_"))}
        lines += ["", ", ".join(f"{k} {cell(v)}" for k, v in means.items()), ""]
    lines += [
        "## Fusion ablation (same split)",
        "",
        "| variant | accuracy | macro-F1 | note |",
        "|---|---|---|---|",
    ]
    for row in report.ablation:
        note = row.get("status") or (f"coverage {row['coverage']:.3f}" if "coverage" in row else "")
        lines.append(
            f"| {row['variant']} | {cell(row.get('accuracy'))} | {cell(row.get('macro_f1'))} "
            f"| {note} |"
        )
    lines += [
        "",
        "## Confidence-threshold reject rule",
        "",
        "| threshold | coverage | accuracy on accepted |",
        "|---|---|---|",
    ]
    for row in report.reject:
        lines.append(
            f"| {row['threshold']:.2f} | {row['coverage']:.3f} | {cell(row['accuracy_accepted'])} |"
        )
    lines.append("")
    return "\n".join(lines)
