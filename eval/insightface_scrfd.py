"""insightface 0.7.3 ``model_zoo/scrfd.py`` (``SCRFD.detect``) re-stated: the reference for SCRFD parity and speed.

Same steps and the same numpy operations in the same order as the original (deepinsight/insightface
python-package 0.7.3): letterbox with ``cv2.resize`` into a black ``det_size`` canvas, ``blobFromImage``
(1/128, mean 127.5, swapRB), one session run per image, every anchor decoded (``distance2bbox`` /
``distance2kps``) before the score filter, vstack, division by the resize factor, score sort and the greedy
+1-area NMS. Used by ``eval/bench_detection.py`` and by ``tests/detection/test_scrfd.py`` (loaded by path).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

LAYOUTS = {6: (3, (8, 16, 32), 2, False), 9: (3, (8, 16, 32), 2, True),
           10: (5, (8, 16, 32, 64, 128), 1, False), 15: (5, (8, 16, 32, 64, 128), 1, True)}


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    return np.stack([points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
                     points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    coordinates = []
    for i in range(0, distance.shape[1], 2):
        coordinates.append(points[:, i % 2] + distance[:, i])
        coordinates.append(points[:, i % 2 + 1] + distance[:, i + 1])
    return np.stack(coordinates, axis=-1)


class InsightfaceScrfd:
    """``SCRFD(session=...)`` then ``prepare(det_thresh=..., input_size=det_size)``; ``detect(img)``."""

    def __init__(self, session: Any, det_thresh: float = 0.5, det_size: tuple[int, int] = (640, 640), nms_thresh: float = 0.4):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        outputs = session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.batched = len(outputs[0].shape) == 3
        self.fmc, self.strides, self.num_anchors, self.use_kps = LAYOUTS[len(outputs)]
        self.det_thresh, self.input_size, self.nms_thresh = det_thresh, det_size, nms_thresh
        self.center_cache: dict = {}

    def forward(self, img: np.ndarray, threshold: float):
        scores_list, bboxes_list, kpss_list = [], [], []
        blob = self.blob(img)
        outs = self.session.run(self.output_names, {self.input_name: blob})
        input_height, input_width = blob.shape[2], blob.shape[3]
        fmc = self.fmc
        for idx, stride in enumerate(self.strides):
            pick = (lambda k: outs[k][0]) if self.batched else (lambda k: outs[k])
            scores = pick(idx)
            bbox_preds = pick(idx + fmc) * stride
            if self.use_kps:
                kps_preds = pick(idx + 2 * fmc) * stride
            height, width = input_height // stride, input_width // stride
            key = (height, width, stride)
            if key not in self.center_cache:
                centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
                centers = (centers * stride).reshape((-1, 2))
                if self.num_anchors > 1:
                    centers = np.stack([centers] * self.num_anchors, axis=1).reshape((-1, 2))
                self.center_cache[key] = centers
            centers = self.center_cache[key]
            positive = np.where(scores >= threshold)[0]
            bboxes = distance2bbox(centers, bbox_preds)
            scores_list.append(scores[positive])
            bboxes_list.append(bboxes[positive])
            if self.use_kps:
                kpss = distance2kps(centers, kps_preds)
                kpss_list.append(kpss.reshape((kpss.shape[0], -1, 2))[positive])
        return scores_list, bboxes_list, kpss_list

    def letterbox(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        """The first lines of ``detect``: ``(det_img, det_scale)``."""
        det_width, det_height = self.input_size
        im_ratio = float(img.shape[0]) / img.shape[1]
        if im_ratio > float(det_height) / det_width:
            new_height = det_height
            new_width = int(new_height / im_ratio)
        else:
            new_width = det_width
            new_height = int(new_width * im_ratio)
        det_scale = float(new_height) / img.shape[0]
        det_img = np.zeros((det_height, det_width, 3), dtype=np.uint8)
        det_img[:new_height, :new_width, :] = cv2.resize(img, (new_width, new_height))
        return det_img, det_scale

    def blob(self, img: np.ndarray) -> np.ndarray:
        """The network input ``forward`` makes of a letterboxed image (for timing the stages apart)."""
        return cv2.dnn.blobFromImage(img, 1.0 / 128.0, tuple(img.shape[0:2][::-1]), (127.5, 127.5, 127.5), swapRB=True)

    def detect(self, img: np.ndarray):
        det_img, det_scale = self.letterbox(img)
        scores_list, bboxes_list, kpss_list = self.forward(det_img, self.det_thresh)
        scores = np.vstack(scores_list)
        order = scores.ravel().argsort()[::-1]
        bboxes = np.vstack(bboxes_list) / det_scale
        pre_det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)[order, :]
        keep = self.nms(pre_det)
        det = pre_det[keep, :]
        kpss = None
        if self.use_kps:
            kpss = (np.vstack(kpss_list) / det_scale)[order, :, :][keep, :, :]
        return det, kpss

    def nms(self, dets: np.ndarray) -> list[int]:
        x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        order = scores.argsort()[::-1]
        keep = []
        while order.size > 0:
            i = order[0]
            keep.append(i)
            w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
            h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
            inter = w * h
            overlap = inter / (areas[i] + areas[order[1:]] - inter)
            order = order[np.where(overlap <= self.nms_thresh)[0] + 1]
        return keep


def reference_rows(detector: InsightfaceScrfd, img: np.ndarray) -> np.ndarray:
    """``detect`` as facepipe rows ``(N, 15)``; NaN landmarks for graphs without keypoints."""
    det, kpss = detector.detect(img)
    points = kpss.reshape(-1, 10) if kpss is not None else np.full((len(det), 10), np.nan, dtype=np.float32)
    return np.hstack([det, points]).astype(np.float32)
