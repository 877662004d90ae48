import numpy as np
import pytest

from mmlora.eval.seg_metrics import SegMetrics


def _reference(preds, labels, c, ignore=255):
    """An independent computation: one confusion matrix over the whole dataset."""
    conf = np.zeros((c, c), dtype=np.int64)
    for p, l in zip(preds, labels):
        keep = l != ignore
        for a, b in zip(l[keep].ravel(), p[keep].ravel()):
            if 0 <= b < c:
                conf[a, b] += 1
    inter = np.diag(conf)
    label_area = conf.sum(1) + np.array([sum(((l == k) & ((p < 0) | (p >= c))).sum() for p, l in zip(preds, labels)) for k in range(c)])
    pred_area = conf.sum(0)
    union = label_area + pred_area - inter
    iou = [inter[k] / union[k] for k in range(c) if union[k] > 0]
    freq = label_area / label_area.sum()
    fw = sum(freq[k] * inter[k] / union[k] for k in range(c) if union[k] > 0)
    return np.mean(iou), inter.sum() / label_area.sum(), fw


def test_matches_an_independent_dataset_level_computation():
    rng = np.random.default_rng(0)
    c = 5
    preds, labels = [], []
    for size in ((7, 9), (16, 16), (3, 5)):
        label = rng.integers(0, c, size)
        label[rng.random(size) < 0.2] = 255  # ignored pixels
        label[label == 3] = 1  # class 3 never occurs in the labels ...
        pred = np.where(rng.random(size) < 0.6, label, rng.integers(0, c + 1, size))  # ... but is predicted; c is out of range
        pred[label == 255] = 0
        preds.append(pred)
        labels.append(label)
    m = SegMetrics(c)
    for p, l in zip(preds, labels):
        m.update(p, l)
    out = m.compute()
    miou, aacc, fw = _reference(preds, labels, c)
    assert out["mIoU"] == pytest.approx(miou) and out["aAcc"] == pytest.approx(aacc) and out["fwIoU"] == pytest.approx(fw)
    assert out["IoU"][3] == 0.0  # predicted but absent: counts, as zero
    # not the per-image average (what torchmetrics' MeanIoU computes)
    per_image = []
    for p, l in zip(preds, labels):
        one = SegMetrics(c)
        one.update(p, l)
        per_image.append(one.compute()["mIoU"])
    assert abs(np.mean(per_image) - out["mIoU"]) > 1e-3


def test_classes_never_seen_nor_predicted_do_not_count_and_zero_label_reduces():
    m = SegMetrics(4)
    m.update(np.array([[0, 1, 1, 1]]), np.array([[0, 0, 1, 255]]))  # the ignored pixel's prediction is dropped too
    out = m.compute()
    assert out["IoU"][:2] == [0.5, 0.5] and out["IoU"][2] is None and out["IoU"][3] is None
    assert out["mIoU"] == pytest.approx(0.5) and out["mAcc"] == pytest.approx(0.75)
    ade = SegMetrics(3, reduce_zero_label=True)
    ade.update(np.array([[0, 1, 2, 1]]), np.array([[1, 2, 0, 3]]))  # label 0 is "other": ignored
    assert ade.compute()["aAcc"] == pytest.approx(2 / 3) and ade.label_area.tolist() == [1, 1, 1]
