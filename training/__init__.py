"""Training code: datasets, augmentation, networks, losses, blurring maths and the loop."""
