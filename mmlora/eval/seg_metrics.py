"""Segmentation metrics as the segmentation community computes them (mmsegmentation's definition).

Intersection and union are summed per class over the *whole dataset* before dividing: IoU per class
= total intersection / total union; mIoU = the mean over classes whose union is non-zero (classes
that neither occur nor are predicted do not count; a class predicted but absent scores 0). Pixel
accuracy (aAcc) = correct / labelled pixels; mAcc = mean per-class recall; frequency-weighted IoU
weights each class's IoU by its share of labelled pixels. Pixels labelled ``ignore_index`` (255) are
left out; ``reduce_zero_label`` applies ADE20K's convention (0 → ignore, v → v-1) to the labels.

This is deliberately not torchmetrics' ``MeanIoU``, which averages IoU per image and so weights
small images and rare classes differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegMetrics:
    num_classes: int
    ignore_index: int = 255
    reduce_zero_label: bool = False
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    pred_area: np.ndarray = field(init=False)
    label_area: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        zeros = lambda: np.zeros(self.num_classes, dtype=np.int64)  # noqa: E731
        self.intersection, self.union, self.pred_area, self.label_area = zeros(), zeros(), zeros(), zeros()

    def update(self, pred, label) -> None:
        """Add one prediction and its label map (any matching shapes; tensors or arrays of class ids)."""
        pred = np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred).astype(np.int64).ravel()
        label = np.asarray(label.cpu() if hasattr(label, "cpu") else label).astype(np.int64).ravel()
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
        if self.reduce_zero_label:
            label = np.where(label == 0, self.ignore_index, np.where(label == self.ignore_index, self.ignore_index, label - 1))
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        c = self.num_classes
        valid_pred = (pred >= 0) & (pred < c)  # out-of-range predictions are simply wrong
        hit = pred[(pred == label) & valid_pred]
        inter = np.bincount(hit, minlength=c)[:c]
        area_pred = np.bincount(pred[valid_pred], minlength=c)[:c]
        area_label = np.bincount(label, minlength=c)[:c]
        self.intersection += inter
        self.pred_area += area_pred
        self.label_area += area_label
        self.union += area_pred + area_label - inter

    def compute(self) -> dict:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(self.union > 0, self.intersection / self.union, np.nan)
            acc = np.where(self.label_area > 0, self.intersection / self.label_area, np.nan)
        labelled = self.label_area.sum()
        freq = self.label_area / labelled if labelled else np.zeros_like(iou)
        present = self.union > 0
        return {
            "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
            "aAcc": float(self.intersection.sum() / labelled) if labelled else float("nan"),
            "mAcc": float(np.nanmean(acc)) if (self.label_area > 0).any() else float("nan"),
            "fwIoU": float(np.nansum(freq * np.nan_to_num(iou))),
            "IoU": [None if np.isnan(v) else float(v) for v in iou],
            "Acc": [None if np.isnan(v) else float(v) for v in acc],
        }
