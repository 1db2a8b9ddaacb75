"""Backbone comparison (the paper's Table 04): each backbone trained alone under one
budget and scored on the validation split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import PreparedData, prepare_data
from orthovision.model.backbones import build_ensemble
from orthovision.model.card import CARD_FILE
from orthovision.training.loop import copy_config, train

log = logging.getLogger(__name__)


# Backbone comparison (paper Table 04)

# timm name and initial weights; only Lite0 has ImageNet weights offline, so the paper's
# ImageNet-initialised backbones train from scratch here (stated in the table).
PAPER_BACKBONES: tuple[str, ...] = (
    "efficientnet_b0",
    "efficientnetv2_rw_s",
    "mobilenetv3_small_100",
    "rexnet_100",
    "convnextv2_femto",
    "tf_efficientnet_lite0:lite0-package",
)


def compare_backbones(
    cfg: OrthoVisionConfig,
    backbones: Sequence[str],
    out_dir: Path | str,
    *,
    progress: bool = False,
    data: PreparedData | None = None,
) -> list[dict]:
    """Train each backbone alone under identical conditions (data, split, seed, budget).

    `backbones`: "timm_name" or "timm_name:initial_weights". A backbone the config's model
    already names keeps that branch's name, so the recipe's per-branch settings
    (`frozen_prefixes`, `branch_lr`) apply to it as in the ensemble; every other backbone
    gets the recipe's shared settings. Scored on the validation split (a model-selection
    question; the test split stays untouched). Resumable: rows already in compare.json are
    kept and an interrupted backbone continues from its last completed pass. Returns one
    row per backbone and writes compare.json.
    """
    from orthovision.config import BackboneConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "compare.json"
    done = {r.get("spec"): r for r in json.loads(table.read_text())} if table.is_file() else {}
    if data is None:
        data = prepare_data(cfg, progress=progress)
    rows = []
    for spec in backbones:
        if spec in done:
            rows.append(done[spec])
            continue
        timm_name, _, init = spec.partition(":")
        init = init or "none"
        known = {(b.timm_name, b.pretrained): b.name for b in cfg.model.backbones}
        name = known.get((timm_name, init), timm_name)
        backbone = BackboneConfig(name=name, timm_name=timm_name, pretrained=init)
        model_cfg = cfg.model.model_copy(update={"backbones": (backbone,), "fusion_init": (1.0,)})
        run_cfg = cfg.model_copy(update={"model": model_cfg})
        prefix = f"branches.{name}."
        run_cfg = copy_config(
            run_cfg,
            mode="branches-then-ensemble",
            fusion_epochs=0,
            frozen_prefixes=[p for p in cfg.train.frozen_prefixes if p.startswith(prefix)],
            branch_lr={k: v for k, v in cfg.train.branch_lr.items() if k == name},
        )
        started = time.monotonic()
        path = train(
            run_cfg,
            out_dir / timm_name.replace("/", "_"),
            data=data,
            progress=progress,
            evaluate_test=False,
            resume=True,
        )
        card = json.loads((path / CARD_FILE).read_text())
        tr = card["training"]
        val = tr["validation"][name]
        n_params = sum(p.numel() for p in build_ensemble(model_cfg).parameters())
        rows.append(
            {
                "spec": spec,
                "backbone": timm_name,
                "initial_weights": backbone.pretrained,
                "params_m": round(n_params / 1e6, 2),
                "lr": run_cfg.train.branch_lr.get(name, run_cfg.train.lr),
                "frozen": list(run_cfg.train.frozen_prefixes),
                "val_auc": val.get("auc"),
                "val_macro_f1": val["macro_f1"],
                "val_accuracy": val["accuracy"],
                "best_epoch": tr["best_epochs"].get(name),
                "epochs": tr["epochs_run"],
                "train_img_per_s": tr["train_img_per_s"],
                "wall_time_s": round(time.monotonic() - started, 1),
            }
        )
        log.info("compare %s: %s", spec, rows[-1])
        table.write_text(json.dumps(rows, indent=1) + "\n")
    return rows
