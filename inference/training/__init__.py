"""Training ensembles the nnUNet-B way: cyclic schedules, augmentation, segmentation and nuclei training, a lab's
labels as targets, pseudo-labels, fine-tuning against forgetting, training-domain statistics, the training report."""
