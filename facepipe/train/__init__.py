"""Training RetinaFace: data readers, augmentation, anchor matching, multi-task loss with OHEM, the loop."""
