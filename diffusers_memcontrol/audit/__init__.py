"""`memcontrol audit`: the calibrated extraction attack on any diffusers fine-tune, and its report."""
