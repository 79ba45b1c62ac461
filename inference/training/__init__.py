"""Training ensembles the nnUNet-B way: cyclic schedules, augmentation, segmentation and nuclei training."""
