"""What a finished run leaves next to its adapter: ``report.md``, ``loss.png`` and manifest fields.

All functions are pure (inputs -> file or dict) so they are tested without training.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubetune import api

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "deeplake")


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def loss_series(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) points from ``trainer.state.log_history``."""
    train = [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]
    evaluation = [(int(h["step"]), float(h["eval_loss"])) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evaluation


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train and eval loss against the step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evaluation = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker="." if len(train) < 50 else None)
    if evaluation:
        ax.plot(*zip(*evaluation, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evaluation:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# methods dpo, orpo and kto: TRL's logged reward metrics -> status.progress fields (and the report's, "final...")
PREFERENCE_METRICS = {"rewards/accuracies": "rewardAccuracy", "rewards/margins": "rewardMargin",
                      "rewards/chosen": "rewardChosen", "rewards/rejected": "rewardRejected", "kl": "kl",
                      "nll_loss": "nllLoss", "log_odds_chosen": "logOddsRatio",
                      "eval_rewards/accuracies": "evalRewardAccuracy", "eval_rewards/margins": "evalRewardMargin"}


def metrics_from(log_history: list[dict[str, Any]], train_metrics: dict[str, Any], resumed: bool = False
                 ) -> dict[str, Any]:
    """Final metrics for the manifest and report (camelCase), from the whole run's ``log_history``
    (it spans every pod of a resumed run). ``trainLoss`` is the step-weighted mean of the logged
    losses; ``trainer.train()``'s own figures count this pod's steps only, so after a resume its
    runtime and throughput are left out rather than reported wrong."""
    import math

    train, evaluation = loss_series(log_history)
    out: dict[str, Any] = {}
    if train:
        out["firstLoss"], out["finalLoss"] = train[0][1], train[-1][1]
        spans = [step - before for (step, _), before in zip(train, [0] + [s for s, _ in train[:-1]], strict=True)]
        out["trainLoss"] = sum(loss * n for (_, loss), n in zip(train, spans, strict=True)) / sum(spans)
    if evaluation:
        out["finalEvalLoss"] = evaluation[-1][1]
        out["finalEvalPerplexity"] = math.exp(min(evaluation[-1][1], 700.0))
    for key, name in PREFERENCE_METRICS.items():  # preference methods: the last logged value
        logged = [entry[key] for entry in log_history if key in entry]
        if logged:
            out[f"final{name[0].upper()}{name[1:]}"] = logged[-1]
    mapping = {"total_flos": "totalFlos"}
    if not resumed:
        mapping.update({"train_runtime": "trainRuntimeSeconds", "train_samples_per_second": "samplesPerSecond"})
    for key, name in mapping.items():
        if key in train_metrics:
            out[name] = train_metrics[key]
    return out


def method_summary(spec: api.FineTuneJobSpec) -> str:
    if spec.method == "dpo":
        d = spec.dpo_settings()
        return f"dpo (beta {d.beta}, loss {d.loss_type}" + (f", label smoothing {d.label_smoothing}"
                                                           if d.label_smoothing else "") + ")"
    if spec.method == "orpo":
        return f"orpo (beta {spec.orpo_settings().beta})"
    if spec.method == "kto":
        k = spec.kto_settings()
        return (f"kto (beta {k.beta}, loss {k.loss_type}, weights {k.desirable_weight} desirable / "
                f"{k.undesirable_weight} undesirable)")
    return "sft"


def render_report(name: str, spec: api.FineTuneJobSpec, result: dict[str, Any], metrics: dict[str, Any],
                  log_history: list[dict[str, Any]], versions: dict[str, str], data_stats: dict[str, Any]) -> str:
    """The Markdown report (adapter location, data, settings, metrics, loss table, versions)."""
    t, q, lora = spec.training, spec.quantization, spec.lora
    progress = result.get("progress", {})
    lines = [
        f"# Fine-tune report: {name}",
        "",
        f"- Base model: `{spec.model.display()}`",
        f"- Adapter: `{result.get('adapterUri', '')}`",
        f"- Dataset: `{spec.dataset.uri}` ({spec.dataset.source}, format {spec.dataset.format})",
        f"- Steps: {progress.get('step', '?')} / {progress.get('totalSteps', '?')}"
        + (f", {progress['tokensPerSecond']:.0f} tokens/s" if progress.get("tokensPerSecond") else ""),
        "",
        "![loss](loss.png)",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method_summary(spec)} |",
        f"| quantization | {q.bits}-bit" + (f" {q.type}, double quant {q.double_quant}" if q.bits == 4 else "") + " |",
        f"| LoRA | r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={','.join(lora.target_modules)} |",
        f"| packing | {t.packing}, maxLength {t.max_length} |",
        f"| batch | {t.batch_size} x {t.gradient_accumulation_steps} accumulation |",
        f"| learning rate | {t.learning_rate} ({t.lr_scheduler}, warmup {t.warmup_ratio}) |",
        f"| seed | {t.seed} |",
        "",
        "## Data",
        "",
        *[f"- {key}: {value}" for key, value in data_stats.items()],
        "",
        "## Metrics",
        "",
        *[f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}"
          for key, value in metrics.items()],
        "",
        "## Loss",
        "",
        "| step | train loss | eval loss |",
        "|---|---|---|",
    ]
    train, evaluation = loss_series(log_history)
    by_step: dict[int, list[str]] = {}
    for step, loss in train:
        by_step.setdefault(step, ["", ""])[0] = f"{loss:.4f}"
    for step, loss in evaluation:
        by_step.setdefault(step, ["", ""])[1] = f"{loss:.4f}"
    lines += [f"| {step} | {a} | {b} |" for step, (a, b) in sorted(by_step.items())]
    lines += ["", "## Versions", "", *[f"- {k} {v}" for k, v in versions.items()], ""]
    return "\n".join(lines)
