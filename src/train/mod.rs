//! Training: the loop, AdamW with parameter groups, the lr schedule, augmentation, checkpoints.
