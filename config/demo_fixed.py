# The fixed-depth baseline for the demo: the same parameters, one pass of the core block, no random depth,
# and about the same wall-clock budget as config/demo.py: 2.3x the steps (~22 vs ~50 ms per step on 2 cores).
# python train.py config/demo.py config/demo_fixed.py
out_dir = "out-demo-fixed"
mean_recurrence = 1
backprop_depth = 1
random_depth = False
max_iters = 30000
lr_decay_iters = 30000
warmup_iters = 900
